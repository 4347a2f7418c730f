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
    other = data["kinds"]["other"]
    assert by_test["test_plain_failure"]["kind"] == by_test["test_setup_error"]["kind"] == "other"
    assert data["totals"]["error"] + other["failed"] + other["error"] == 3  # red in pytest -> red in the report
    line = ("*2 determinism checks: 1 passed, 0 failed, 0 not applicable, 1 error; 2 failing tests outside the "
            "checks (from 5 pytest tests: 2 passed, 2 failed, 1 error)*")
    result.stdout.fnmatch_lines([line])
    assert data["summary"] in result.stdout.str()
    text = page.read_text()
    assert "CheckpointError" in text and "fixture exploded" in text and "from 5 pytest tests" in text


KINDS = """
import pytest
from pytest_miles import NotApplicable

def test_refused(miles_record):
    miles_record("precision bf16 x fp8", kind="refusal", rule="rejected: mixed FP8")

def test_doctor(miles_record):
    miles_record("doctor", kind="setup", ok=3)

def test_measured(miles_record):
    miles_record("rollout batch invariance", items=8)

def test_not_here(miles_record):
    miles_record("cost of determinism", result="not meaningful here")
    raise NotApplicable("not meaningful on CPU")

def test_bad_kind(miles_record):
    miles_record("x", kind="vibes")
"""


def test_totals_count_determinism_apart_from_refusals_and_setup(pytester):
    """Rule refusals and setup checks pass without measuring determinism: they are counted apart, so
    the determinism total is what was measured."""
    pytester.makepyfile(KINDS)
    out = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-p", "no:randomly", f"--miles-report={out}")
    result.assert_outcomes(passed=3, skipped=1, failed=1)
    data = json.loads(out.read_text())
    assert data["schema_version"] == 3
    kinds = {c["check"]: c["kind"] for c in data["checks"]}
    assert kinds["precision bf16 x fp8"] == "refusal" and kinds["doctor"] == "setup"
    assert kinds["rollout batch invariance"] == kinds["cost of determinism"] == "determinism"
    assert data["totals"]["passed"] == 1 and data["totals"]["skipped"] == 1
    assert data["kinds"]["refusal"]["passed"] == 1 and data["kinds"]["setup"]["passed"] == 1
    result.stdout.fnmatch_lines([
        "REFUSED *precision bf16 x fp8*rule=rejected: mixed FP8*",
        "*3 determinism checks: 1 passed, 1 failed, 1 not applicable; 1 rule refusals confirmed; "
        "1 setup checks: 1 passed, 0 failed (from 5 pytest tests: 3 passed, 1 failed, 1 skipped)*"])
    result.stdout.fnmatch_lines(["*miles_record(kind=): 'vibes'*one of determinism, refusal, setup*"])


CAUGHT = """
import pytest
from pytest_miles import assert_checkpoints_equal, negative_control
from pytest_miles.engines.reference import ReferenceEngine

def test_helper_refusing_bad_input_as_the_test_wants(tmp_path):
    with pytest.raises(Exception, match="missing_a"):
        assert_checkpoints_equal(tmp_path / "missing_a", tmp_path / "missing_b")

def test_a_negative_control_that_worked():
    with pytest.raises(AssertionError):
        negative_control(ReferenceEngine(deterministic=True), "single", trials=2, prompt_len=8)
"""


def test_a_caught_error_is_no_check_and_a_caught_failure_is_a_negative_control(pytester):
    """A test that checks a helper's error path (pytest.raises around bad input) measured no determinism: it is
    not counted as a check; a caught AssertionError is (the negative control's "caught")."""
    pytester.makepyfile(CAUGHT)
    out = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-p", "no:randomly", f"--miles-report={out}")
    result.assert_outcomes(passed=2)
    checks = json.loads(out.read_text())["checks"]
    assert [(c["nodeid"].split("::")[-1], c["outcome"]) for c in checks] == [
        ("test_a_negative_control_that_worked", "caught")], checks
    result.stdout.fnmatch_lines(["*1 determinism checks: 0 passed, 0 failed, 0 not applicable, 1 caught (from 2 "
                                 "pytest tests: 2 passed)*"])
