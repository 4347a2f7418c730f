"""The determinism report: what each check measured, collected from test reports (so it works
under pytest-xdist: workers attach records to their reports, the controller merges them),
printed as a terminal summary section and written as JSON with --miles-report (and as one
self-contained HTML file with --miles-report-html, see report_html).

A "determinism check" is a line recorded by a test (`miles_record`), by an `assert_*` helper
running inside a test (pytest_miles.recording), or, when a test that uses a pytest-miles
fixture or marker recorded nothing (it skipped, xfailed or failed before its helper ran), the
test itself, with pytest's reason. So a skipped check is never missing from the report. Any other
test that fails or errors is in the report too (source "test"), so the report is never green
while pytest is red; pytest's own per-test totals are kept beside the checks' ("tests").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles._files import atomic_write
from pytest_miles._files import atomic_write as write_atomic  # noqa: F401  (the earlier name, importable here too)

KEY = "miles_check"
CHECK_TEST = "miles_check_test"  # user property: this test is a determinism check, named so
SCHEMA = "pytest-miles/report"
SCHEMA_VERSION = 2
# "caught": a helper's failure that its test expected and caught (a negative control that worked).
# "inconclusive": a timing figure whose spread covers its claim (noise, said as noise).
# "timeout": a stage (setup, call, teardown) ran past pytest-timeout's limit: not a determinism verdict.
OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error", "caught", "inconclusive", "timeout")
TEST_OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error")


@dataclass
class Entry:
    nodeid: str
    check: str
    outcome: str
    figures: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    reason: str = ""
    source: str = "record"  # record (miles_record) | helper (an assert_* helper) | test (nothing recorded)


def _timed_out(report) -> bool:
    """pytest-timeout's verdict ("Failed: Timeout (>300.0s) from pytest-timeout."), not the test's."""
    text = str(getattr(getattr(report.longrepr, "reprcrash", None), "message", "") or "")
    return report.outcome == "failed" and "Timeout (>" in text and "pytest-timeout" in text


def _outcome(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.outcome == "skipped" else "xpassed"
    if _timed_out(report):
        return "timeout"
    if report.outcome == "failed" and report.when != "call":
        return "error"
    return report.outcome


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail)
    if _timed_out(report):
        crash = report.longrepr.reprcrash.message.splitlines()[0].removeprefix("Failed: ")
        return (f"timeout of the {report.when} stage after {report.duration:.0f} s ({crash}); "
                "not a determinism verdict")
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
    return str(crash if crash is not None else longrepr).splitlines()[0][:300] if str(longrepr) else ""


@dataclass
class _Pending:
    name: str | None = None
    entries: list[Entry] = field(default_factory=list)
    outcome: str = "passed"
    reason: str = ""
    duration: float = 0.0


@dataclass
class Collector:
    entries: list[Entry] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    pending: dict[str, _Pending] = field(default_factory=dict)
    tests: dict[str, str] = field(default_factory=dict)  # nodeid -> pytest's outcome for that test

    def add_report(self, report) -> bool:
        """Feed one phase's report; True when entries were added (the JSON is then rewritten)."""
        p = self.pending.setdefault(report.nodeid, _Pending())
        p.duration += getattr(report, "duration", 0.0) or 0.0
        props = getattr(report, "user_properties", ())
        for name, value in props:
            if name == CHECK_TEST:
                p.name = value
        outcome = _outcome(report)
        if outcome != "passed" and p.outcome == "passed":
            p.outcome, p.reason = outcome, _reason(report)
        before = len(self.entries)
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            for name, value in props:
                if name == KEY:
                    own = value.get("outcome")
                    if own in ("failed", "error") and report.when == "call" and report.outcome == "passed":
                        own = "caught"  # a failure the test expected (pytest.raises): its own negative control
                    e = Entry(report.nodeid, value["check"], own or outcome, value.get("figures", {}),
                              float(value.get("duration", report.duration) or 0.0),
                              value.get("reason") or ("" if own else _reason(report)), value.get("source", "record"))
                    p.entries.append(e)
                    self.entries.append(e)
        if report.when == "teardown":
            self.pending.pop(report.nodeid, None)
            self.tests[report.nodeid] = "failed" if p.outcome == "timeout" else p.outcome  # pytest's count
            if not p.name and not p.entries and p.outcome in ("failed", "error", "timeout"):
                p.name = report.nodeid  # a failing test outside the checks: pytest is red, so is the report
            if p.name and not p.entries:
                e = Entry(report.nodeid, p.name, p.outcome, {}, round(p.duration, 3), p.reason, "test")
                p.entries.append(e)
                self.entries.append(e)
        return len(self.entries) > before

    def totals(self) -> dict[str, int]:
        counts = {o: sum(e.outcome == o for e in self.entries) for o in OUTCOMES}
        return {"checks": len(self.entries), **counts}

    def test_totals(self) -> dict[str, int]:
        """pytest's totals, one outcome per test: its first outcome that was not "passed" (pytest
        counts a passed test with a teardown error twice: "1 passed, 1 error"; here it is 1 error)."""
        counts = {o: sum(v == o for v in self.tests.values()) for o in TEST_OUTCOMES}
        return {"tests": len(self.tests), **counts}

    def summary(self) -> str:
        """The one total line: the checks, and pytest's tests they came from."""
        t, pt = self.totals(), self.test_totals()
        checks = ", ".join(f"{t[o]} {o}" for o in OUTCOMES if t[o] or o in ("passed", "failed", "skipped"))
        tests = ", ".join(f"{pt[o]} {o}" for o in TEST_OUTCOMES if pt[o])
        tests = tests or "none"
        return f"{t['checks']} determinism checks: {checks} (from {pt['tests']} pytest tests: {tests})"

    def lines(self) -> list[str]:
        out = []
        width = min(max((len(e.check) for e in self.entries), default=10), 70)
        for e in self.entries:
            figures = ", ".join(f"{k}={_short(v)}" for k, v in e.figures.items() if k != "message")
            why = f"  ({_short(e.reason.splitlines()[0], 160)})" if e.reason and e.outcome != "passed" else ""
            out.append(f"{e.outcome.upper():8} {e.check:{width}} {e.duration_s:7.2f}s  {figures}{why}")
        out.append(self.summary())
        return out

    def to_json(self, fingerprint: dict[str, Any], complete: bool = True) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": complete,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "duration_s": round(time.time() - self.started, 3), "totals": self.totals(),
                "tests": self.test_totals(), "summary": self.summary(),
                "fingerprint": fingerprint, "checks": [vars(e) for e in self.entries]}

    def write(self, path: str | Path, fingerprint: dict[str, Any], complete: bool = True) -> None:
        """Atomic write. Written after every check too (complete=False), so that a run killed by
        a CI timeout still leaves the figures of every check it finished."""
        atomic_write(path, json.dumps(self.to_json(fingerprint, complete), indent=1, default=str))


def _short(value: Any, width: int = 60) -> str:
    text = str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


