"""The report's totals are pytest's totals: every failing test is in the JSON and HTML report with
its message, whether or not a helper recorded itself, and one summary line states both counts."""

from __future__ import annotations

import json

import pytest

TESTS = """
import pytest
from pytest_miles import assert_checkpoints_equal

def test_bad_input_to_a_helper(tmp_path):
    # no pytest-miles fixture: the helper raises CheckpointError (not AssertionError) on missing folders
    assert_checkpoints_equal(tmp_path / "missing_a", tmp_path / "missing_b")

def test_plain_failure():
    assert 1 == 2, "a plain test that fails"

@pytest.fixture
def broken():
    raise RuntimeError("fixture exploded")

def test_setup_error(broken):
    pass

def test_plain_pass():
    pass

def test_check(miles_record):
    miles_record("a recorded check", value=1)
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_every_failing_test_is_in_the_report_with_its_message(pytester, workers):
    pytester.makepyfile(TESTS)
    out, page = pytester.path / "r.json", pytester.path / "r.html"
    result = pytester.runpytest_subprocess("-n", workers, "-p", "no:randomly", f"--miles-report={out}",
                                           f"--miles-report-html={page}")
    result.assert_outcomes(passed=2, failed=2, errors=1)
    data = json.loads(out.read_text())
    by_test = {c["nodeid"].split("::")[-1]: c for c in data["checks"]}
    helper = by_test["test_bad_input_to_a_helper"]
    assert helper["outcome"] == "error" and helper["source"] == "helper"
    assert "CheckpointError" in helper["reason"] and "missing_a" in helper["reason"]
    assert by_test["test_plain_failure"]["outcome"] == "failed"
    assert "a plain test that fails" in by_test["test_plain_failure"]["reason"]
    assert by_test["test_setup_error"]["outcome"] == "error"
    assert "fixture exploded" in by_test["test_setup_error"]["reason"]
    assert "test_plain_pass" not in by_test  # a passing non-check test is counted, not listed
    assert data["tests"] == {"tests": 5, "passed": 2, "failed": 2, "skipped": 0, "xfailed": 0, "xpassed": 0,
                             "error": 1}
    assert data["totals"]["failed"] + data["totals"]["error"] == 3  # red in pytest -> red in the report
    line = ("*4 determinism checks: 1 passed, 1 failed, 0 skipped, 2 error "
            "(from 5 pytest tests: 2 passed, 2 failed, 1 error)*")
    result.stdout.fnmatch_lines([line])
    assert data["summary"] in result.stdout.str()
    text = page.read_text()
    assert "CheckpointError" in text and "fixture exploded" in text and "from 5 pytest tests" in text
