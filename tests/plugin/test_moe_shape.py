"""--miles-model-shape tiny-moe: the engine fixture serves the mixture-of-experts model, and the
routing helpers record into the determinism report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

INNER = """
from pytest_miles import assert_routing_equal


def test_moe_engine(engine):
    assert engine.config.num_experts == 8 and engine.config.num_experts_per_tok == 2
    report = assert_routing_equal(engine.routing([5, 6, 7, 8]), engine.routing([5, 6, 7, 8]))
    assert (report.tokens, report.layers) == (4, 2)
"""


def test_the_engine_fixture_serves_the_moe_shape(pytester):
    pytester.makepyfile(INNER)
    out = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--miles-model-shape", "tiny-moe",
                                           f"--miles-report={out}")
    result.assert_outcomes(passed=1)
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    assert checks["routing equal"]["outcome"] == "passed" and checks["routing equal"]["figures"]["layers"] == 2


def test_an_unknown_shape_is_refused_naming_the_moe_ones(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--miles-model-shape", "tiny-moee")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*tiny-moee*tiny-moe*qwen3-30b-a3b-2l*"])
