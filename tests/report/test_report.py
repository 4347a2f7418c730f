"""The determinism report: records from tests reach the summary and the JSON, under xdist too."""

from __future__ import annotations

import json

import pytest

TESTS = """
import pytest

@pytest.mark.parametrize("i", range(4))
def test_check(miles_record, i):
    miles_record(f"check {i}", value=i)

def test_failing_check(miles_record):
    miles_record("check that fails", value=-1)
    assert False
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_records_reach_summary_and_json(pytester, workers):
    pytester.makepyfile(TESTS)
    out = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-n", workers, f"--miles-report={out}", "--miles-gpu-class=h100")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*pytest-miles determinism report*", "fingerprint: 1 x NVIDIA H100*",
                                 "*5 determinism checks: 4 passed, 1 failed, 0 not applicable*"])
    data = json.loads(out.read_text())
    assert sorted(c["check"] for c in data["checks"]) == sorted([f"check {i}" for i in range(4)] + ["check that fails"])
    assert {c["check"]: c["outcome"] for c in data["checks"]}["check that fails"] == "failed"
    assert data["fingerprint"]["gpu_capability"] == "sm_90"


def test_no_section_without_records(pytester):
    pytester.makepyfile("def test_x(): pass")
    assert "determinism report" not in pytester.runpytest().stdout.str()


def test_a_killed_run_leaves_the_figures_of_every_finished_check(pytester):
    """CI timeouts kill runs: the JSON report is rewritten after every check, atomically."""
    pytester.makepyfile("""
        import os

        def test_first(miles_record):
            miles_record("first check", figure=1)

        def test_killed(miles_record):
            os._exit(9)  # a CI timeout's SIGKILL, as far as pytest can tell
    """)
    out = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-p", "no:randomly", f"--miles-report={out}")
    assert result.ret == 9
    data = json.loads(out.read_text())
    assert data["complete"] is False
    assert [(c["check"], c["figures"]) for c in data["checks"]] == [("first check", {"figure": 1})]


COMPLETE = """
import pytest
from pytest_miles import assert_batch_invariant
from pytest_miles.recording import record


class Engine:  # a deliberate fake, named as such: a batch-invariant engine needs no torch here
    name = "fake-batch-invariant"
    vocab_size = 50
    deterministic = True

    def generate(self, prompts, params=None):
        from pytest_miles.engines.base import Output
        return [Output(list(p[:2]), [-0.5, -0.25]) for p in prompts]


def test_helper_records_itself():
    report = assert_batch_invariant(Engine(), mode="single", max_batch=2, prompt_len=4)
    record("helper saw trials", "passed", {"trials": report.trials})

@pytest.mark.hopper
def test_gpu_only(engine):
    pass

@pytest.mark.xfail(reason="known upstream limit: flashinfer-ai/flashinfer#2424")
def test_known_limit(miles_record):
    assert False

def test_skips_itself(determinism_snapshot):
    pytest.skip("nothing to compare on this stack")

def test_not_a_check():
    pass
"""


def test_every_check_appears_with_reason_duration_totals_and_schema(pytester):
    pytester.makepyfile(COMPLETE)
    out = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("--miles-gpu-class=none", f"--miles-report={out}", "--miles-trials=3")
    result.assert_outcomes(passed=2, skipped=2, xfailed=1)
    data = json.loads(out.read_text())
    assert data["schema"] == "pytest-miles/report" and data["schema_version"] == 3 and data["complete"]
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["batch invariance [single]"]["source"] == "helper"
    assert checks["batch invariance [single]"]["figures"]["trials"] == 3  # --miles-trials reached the helper
    assert checks["helper saw trials"]["figures"] == {"trials": 3}
    gpu = checks["test_complete_every_check_appears_with_reason_duration_totals_and_schema.py::test_gpu_only"
                 if False else next(k for k in checks if k.endswith("::test_gpu_only"))]
    assert gpu["outcome"] == "skipped" and "requires hopper (sm_90)" in gpu["reason"]
    known = next(c for k, c in checks.items() if k.endswith("::test_known_limit"))
    assert known["outcome"] == "xfailed" and "flashinfer#2424" in known["reason"]
    skipped = next(c for k, c in checks.items() if k.endswith("::test_skips_itself"))
    assert skipped["reason"] == "nothing to compare on this stack"
    assert not any(k.endswith("::test_not_a_check") for k in checks)
    assert data["totals"] == {"checks": 5, "passed": 2, "failed": 0, "skipped": 2, "xfailed": 1, "xpassed": 0,
                              "error": 0, "caught": 0, "inconclusive": 0, "timeout": 0,
                              "unbudgeted": 0}
    assert all(isinstance(c["duration_s"], float) for c in data["checks"]) and data["duration_s"] > 0
    result.stdout.fnmatch_lines(["*5 determinism checks: 2 passed, 0 failed, 2 not applicable, 1 xfailed*"])


def test_a_helper_failure_the_test_expected_is_caught_not_failed(pytester):
    """A user's negative control (`pytest.raises(AssertionError)` around a helper) is a check that
    worked: reported `caught`, never `failed`; an uncaught helper failure stays `failed`."""
    pytester.makepyfile("""
        import pytest
        from pytest_miles import assert_checkpoints_equal

        def _pair(tmp_path, flip):
            from safetensors.numpy import save_file
            import numpy as np
            for name, v in (("a", 1.0), ("b", 2.0 if flip else 1.0)):
                save_file({"w": np.full(4, v, dtype=np.float32)}, str(tmp_path / f"{name}.safetensors"))
            return tmp_path / "a.safetensors", tmp_path / "b.safetensors"

        def test_negative_control(tmp_path):
            with pytest.raises(AssertionError):
                assert_checkpoints_equal(*_pair(tmp_path, flip=True))

        def test_regression(tmp_path):
            assert_checkpoints_equal(*_pair(tmp_path, flip=True))
    """)
    result = pytester.runpytest("--miles-report", "r.json")
    result.assert_outcomes(passed=1, failed=1)
    data = json.loads((pytester.path / "r.json").read_text())
    by_test = {c["nodeid"].split("::")[-1]: c["outcome"] for c in data["checks"]}
    assert by_test == {"test_negative_control": "caught", "test_regression": "failed"}, data["checks"]
    assert data["totals"]["caught"] == 1 and data["totals"]["failed"] == 1


def test_helpers_record_nothing_and_need_no_pytest_outside_a_test():
    import subprocess
    import sys

    code = ("import sys; from pytest_miles.recording import record, setting; record('x', 'passed');"
            "import pytest_miles.checks.batch_invariance, pytest_miles.scenarios.runs;"
            "assert setting('trials', 10) == 10; assert 'pytest' not in sys.modules, 'pytest imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_failure_messages_are_capped_and_the_full_text_is_in_the_report(pytester):
    pytester.makepyfile("""
        from pytest_miles.recording import recorded

        @recorded("long check")
        def assert_long():
            raise AssertionError("\\n".join(f"difference {i}" for i in range(500)))

        def test_long():
            assert_long()
    """)
    out = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(f"--miles-report={out}")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "difference 39" in text and "difference 40\n" not in text
    result.stdout.fnmatch_lines([f"*460 more lines; the full message is in the determinism report {out}*"])
    (check,) = json.loads(out.read_text())["checks"]
    assert check["outcome"] == "failed" and check["reason"].count("difference") == 500


def test_artefacts_go_to_the_report_dir_never_basetemp(pytester):
    pytester.makepyfile("""
        def test_plot(miles_artefact_dir, miles_record):
            (miles_artefact_dir / "p.png").write_bytes(b"x")
            miles_record("plots", plot=str(miles_artefact_dir / "p.png"))
    """)
    result = pytester.runpytest_subprocess(f"--miles-report-dir={pytester.path / 'arts'}")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "arts" / "p.png").exists()
    pytester.runpytest_subprocess(f"--miles-report={pytester.path / 'out' / 'r.json'}").assert_outcomes(passed=1)
    assert (pytester.path / "out" / "p.png").exists()
