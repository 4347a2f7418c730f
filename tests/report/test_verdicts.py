"""`pytest-miles verdicts OLD NEW`: which verdicts changed between two runs' reports, check by check (outcome
and kind decide; reasons that differ only in numbers or the GPU's name are the same), with one clear error
for a file that is not a report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

LOGS = Path(__file__).resolve().parents[2] / "docs" / "validation" / "logs"
H200_COLD = LOGS / "2026-12-05-h200" / "suite-cold-flashinfer-report.json"
H100 = LOGS / "2026-12-05-h100"

# One run's checks; NOISY decides whether the figure is measured (passed) or noise (inconclusive).
TESTS = """
import os
from pytest_miles.scenarios.cost import raise_if_inconclusive

def test_figure(miles_record):
    values = [0.2, -0.1, 0.1] if os.environ.get("NOISY") else [-0.1, -0.12, -0.14]
    raise_if_inconclusive("cost of determinism: figure", {}, values)
    miles_record("cost of determinism: figure", seconds=os.environ.get("SECONDS_TAKEN", "1.5"))

def test_other(miles_record):
    miles_record("other check", seconds=os.environ.get("SECONDS_TAKEN", "1.5"))
"""


def _verdicts(pytester, *args):
    return pytester.run(sys.executable, "-m", "pytest_miles.cli", "verdicts", *map(str, args))


def test_two_runs_of_one_suite_a_changed_verdict_is_named_and_exits_1(pytester, monkeypatch):
    pytester.makepyfile(TESTS)
    old, same, noisy = (pytester.path / f"{n}.json" for n in ("old", "same", "noisy"))
    pytester.runpytest_subprocess(f"--miles-report={old}").assert_outcomes(passed=2)
    monkeypatch.setenv("SECONDS_TAKEN", "2.7")  # a measured number differs: the same verdict
    pytester.runpytest_subprocess(f"--miles-report={same}").assert_outcomes(passed=2)
    monkeypatch.setenv("NOISY", "1")
    pytester.runpytest_subprocess(f"--miles-report={noisy}").assert_outcomes(passed=1, skipped=1)

    result = _verdicts(pytester, old, same)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines([f"every verdict unchanged: 2 of 2 checks of {same} have the outcome and kind they "
                                 f"have in {old}"])
    result = _verdicts(pytester, old, noisy)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["verdicts changed: 1 of 2 checks of *",
                                 "changed   cost of determinism: figure  ?test_two_runs_*.py::test_figure?: passed "
                                 "(determinism) -> inconclusive (determinism): inconclusive: cost of determinism: "
                                 "figure: spread -10.0%..+20.0% over 3 pairs covers +0.0%*"])
    data = json.loads(_verdicts(pytester, "--json", old, noisy).stdout.str())
    assert data["unchanged"] is False and data["same"] == 1
    assert [(c["check"], c["old"]["outcome"], c["new"]["outcome"]) for c in data["changed"]] == [
        ("cost of determinism: figure", "passed", "inconclusive")]


def test_the_h100_round_against_the_h200_cold_run():
    """The GPU reports in docs/validation: the H100's warm run has every verdict of the H200's cold run;
    its cold run changed one, the training cost figure (2026-12-05-h100-eighth-round.md)."""
    from pytest_miles.report.verdicts import compare_verdicts, read_report

    base = read_report(str(H200_COLD))
    warm = compare_verdicts(base, read_report(str(H100 / "suite-warm-flashinfer-report.json")))
    assert warm.unchanged and warm.same == 48, warm.render()
    assert [k[1] for k, _, _ in warm.reworded] == ["determinism under load"]  # compile_seconds=#, compilers=[...]
    cold = compare_verdicts(base, read_report(str(H100 / "suite-cold-flashinfer-report.json")))
    assert [(k[1], a["outcome"], b["outcome"]) for k, a, b in cold.changed] == [
        ("cost of determinism: megatron training step", "passed", "inconclusive")]
    assert not cold.unchanged and not cold.missing and not cold.added
    commit = H100 / "suite-commit-warm-flashinfer-report.json"
    subset = compare_verdicts(base, read_report(str(commit)), subset=True)
    assert subset.unchanged and subset.same == 6 and len(subset.missing) == 42
    assert not compare_verdicts(base, read_report(str(commit))).unchanged  # without --subset: 42 missing
    assert "note: " in compare_verdicts(base, read_report(str(H100 / "run3-suite-warm-flashinfer-partial-report.json"))
                                        ).render()  # an incomplete report is said to be one


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", "a pytest-miles report (--miles-report JSON)"),
    ('{"schema": "pytest-miles/snapshot", "checks": []}', 'not a pytest-miles report; expected a JSON object with '
     '"schema": "pytest-miles/report" and a "checks" list'),
    ('[1, 2]', "not a pytest-miles report"),
    ('{"schema": "pytest-miles/report", "checks": [{"nodeid": "t", "check": "c", "outcome": 1, "kind": "k"}]}',
     "checks[0] is not a check record; expected an object with string fields nodeid, check, outcome, kind and "
     "reason"),
    ('{"schema": "pytest-miles/report", "checks": [' + ", ".join(
        ['{"nodeid": "t", "check": "c", "outcome": "passed", "kind": "determinism"}'] * 2) + "]}",
     "checks[1] repeats test 't', check 'c'; a report holds each check once"),
])
def test_a_file_that_is_not_a_report_gets_one_line_and_exit_2(pytester, content, words):
    bad = pytester.path / "bad.json"
    bad.write_text(content)
    result = _verdicts(pytester, H200_COLD, bad)
    assert result.ret == 2 and words in result.stderr.str() and "Traceback" not in result.stderr.str(), \
        result.stderr.str()
    assert result.stderr.str().startswith("pytest-miles verdicts: ") and len(result.stderr.lines) == 1
    missing = _verdicts(pytester, pytester.path / "absent.json", H200_COLD)
    assert missing.ret == 2 and "absent.json" in missing.stderr.str()
