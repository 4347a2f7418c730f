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
                                 "*5 determinism checks: 4 passed, 1 failed, 0 skipped*"])
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
