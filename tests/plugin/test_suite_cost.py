"""The suite's training cost figure, as a user of the bundled suite meets it: where a step's time is noise
(CPU, or a tiny shape's launch-bound step on a GPU) the figure says so as "not applicable", with the
option that measures it, and it is counted as no measurement; it never reaches a sign test there."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")

CHECK = "cost of determinism: megatron training step"


def _run(pytester, tmp_path, *args):
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess("--pyargs", "pytest_miles.suite", "-k", "test_training_cost", "-rs",
                                           "-p", "no:randomly", "--miles-engine-prestart=off",
                                           "--miles-report", str(report), *args)
    result.assert_outcomes(skipped=1)
    records = [c for c in json.loads(report.read_text())["checks"] if c["check"] == CHECK]
    assert len(records) == 1, records
    return result, records[0]


@pytest.mark.parametrize(("args", "why"), [
    ((), "not meaningful on CPU; run it on a GPU with --miles-model-shape qwen2.5-0.5b"),
    (("--miles-model-shape=qwen2.5-0.5b",), "not meaningful on CPU; run it on a GPU"),  # the shape is not enough
    # a GPU asked for on the tiny shape: refused before any rank starts (none could start here)
    (("--miles-device=cuda",), "not meaningful on the tiny shape, whose training step is launch-bound"),
    (("--miles-device=cuda", "--miles-model-shape=tiny-moe"), "not meaningful on the tiny-moe shape, whose"),
    (("--miles-device=cuda", "--miles-model-shape=qwen3-30b-a3b-2l"),
     "not taken on the qwen3-30b-a3b-2l shape: it trains twenty fresh models"),
])
def test_the_training_cost_is_not_applicable_where_its_step_time_is_noise(pytester, tmp_path, args, why):
    result, record = _run(pytester, tmp_path, *args)
    result.stdout.fnmatch_lines([f"*{why}*"])
    assert record["outcome"] == "skipped" and record["kind"] == "determinism", record
    assert "sign_p" not in record["figures"] and record["figures"]["seed_expects"].startswith("-3% to -8%")
    assert record["figures"]["result"] in result.stdout.str(), record
    text = result.stdout.str()
    assert "inconclusive" not in text.split("short test summary")[-1], text
