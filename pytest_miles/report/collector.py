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
STAGE_KEY = "miles_stage"  # user property: the stage a failing test was in (recording.stage)
STAGES_KEY = "miles_stages"  # user property: [label, seconds] of the stages a phase finished
CHECK_TEST = "miles_check_test"  # user property: this test is a determinism check, named so
SCHEMA = "pytest-miles/report"
SCHEMA_VERSION = 3  # 3: each check has a kind; "totals" counts determinism checks only, "kinds" the rest
# "caught": a helper's failure that its test expected and caught (a negative control that worked). A helper's
# error (bad input, a crash) that its test caught is no check at all: nothing was judged.
# "inconclusive": a timing figure whose spread covers its claim (noise, said as noise).
# "unbudgeted": a parity figure for a configuration without a budget (measured, never passed).
# "timeout": a stage (setup, call, teardown) ran past pytest-timeout's limit: not a determinism verdict.
OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error", "caught", "inconclusive", "timeout",
            "unbudgeted")
TEST_OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error")
# What a line is about. Only "determinism" lines are determinism checks; the others are counted apart so
# that a total of passes means determinism measured: "refusal" (a configuration refused by a rule:
# nothing measured, the refusal confirmed), "setup" (the environment the checks rely on: doctor, env
# propagation), "other" (a failing test outside the checks: pytest is red, so is the report).
KINDS = ("determinism", "refusal", "setup", "other")
SAID = {"skipped": "not applicable"}  # how an outcome reads in the summary line


@dataclass
class Entry:
    nodeid: str
    check: str
    outcome: str
    figures: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    reason: str = ""
    source: str = "record"  # record (miles_record) | helper (an assert_* helper) | test (nothing recorded)
    kind: str = "determinism"  # one of KINDS
    stages: list = field(default_factory=list)  # [label, seconds] per finished stage (engine starts, launches)


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
        slow = next((v for k, v in getattr(report, "user_properties", ()) if k == STAGE_KEY), None)
        where = f" while {slow}" if slow else ""
        return (f"timeout of the {report.when} stage after {report.duration:.0f} s{where} ({crash}); "
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
    stages: list = field(default_factory=list)


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
        for name, value in props:
            if name == STAGES_KEY:
                p.stages += [list(done) for done in value]
        outcome = _outcome(report)
        if outcome != "passed" and p.outcome == "passed":
            p.outcome, p.reason = outcome, _reason(report)
        before = len(self.entries)
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            for name, value in props:
                if name == KEY:
                    own = value.get("outcome")
                    expected = report.when == "call" and report.outcome == "passed"  # the test caught it
                    if own == "error" and expected:
                        continue  # a helper refusing its input, as its test wanted: nothing judged, no check
                    if own == "failed" and expected:
                        own = "caught"  # a failure the test expected (pytest.raises): its own negative control
                    e = Entry(report.nodeid, value["check"], own or outcome, value.get("figures", {}),
                              float(value.get("duration", report.duration) or 0.0),
                              value.get("reason") or ("" if own else _reason(report)), value.get("source", "record"),
                              value.get("kind", "determinism"))
                    p.entries.append(e)
                    self.entries.append(e)
        if report.when == "teardown":
            self.pending.pop(report.nodeid, None)
            for e in p.entries:
                e.stages = p.stages
            self.tests[report.nodeid] = "failed" if p.outcome == "timeout" else p.outcome  # pytest's count
            kind = "determinism"
            if not p.name and not p.entries and p.outcome in ("failed", "error", "timeout"):
                p.name, kind = report.nodeid, "other"  # failing outside the checks: pytest is red, so is the report
            if p.name and not p.entries:
                e = Entry(report.nodeid, p.name, p.outcome, {}, round(p.duration, 3), p.reason, "test", kind, p.stages)
                p.entries.append(e)
                self.entries.append(e)
        return len(self.entries) > before

    def totals(self, kind: str = "determinism") -> dict[str, int]:
        """Counts per outcome of the lines of one kind (the determinism checks by default)."""
        entries = [e for e in self.entries if e.kind == kind]
        counts = {o: sum(e.outcome == o for e in entries) for o in OUTCOMES}
        return {"checks": len(entries), **counts}

    def kinds(self) -> dict[str, dict[str, int]]:
        return {k: self.totals(k) for k in KINDS[1:]}

    def test_totals(self) -> dict[str, int]:
        """pytest's totals, one outcome per test: its first outcome that was not "passed" (pytest
        counts a passed test with a teardown error twice: "1 passed, 1 error"; here it is 1 error)."""
        counts = {o: sum(v == o for v in self.tests.values()) for o in TEST_OUTCOMES}
        return {"tests": len(self.tests), **counts}

    def summary(self) -> str:
        """The one total line: the determinism checks, apart from them rule refusals, setup checks and
        failing tests outside the checks, and pytest's tests they all came from."""
        t, pt = self.totals(), self.test_totals()
        checks = ", ".join(f"{t[o]} {SAID.get(o, o)}" for o in OUTCOMES if t[o] or o in ("passed", "failed", "skipped"))
        parts = [f"{t['checks']} determinism checks: {checks}"]
        for kind, k in self.kinds().items():
            if k["checks"]:
                parts.append(_kind_total(kind, k))
        tests = ", ".join(f"{pt[o]} {o}" for o in TEST_OUTCOMES if pt[o]) or "none"
        return "; ".join(parts) + f" (from {pt['tests']} pytest tests: {tests})"

    def lines(self) -> list[str]:
        out = []
        width = min(max((len(e.check) for e in self.entries), default=10), 70)
        for e in self.entries:
            figures = ", ".join(f"{k}={_short(v)}" for k, v in e.figures.items() if k != "message")
            why = f"  ({_short(e.reason.splitlines()[0], 160)})" if e.reason and e.outcome != "passed" else ""
            shown = "REFUSED" if e.kind == "refusal" and e.outcome == "passed" else e.outcome.upper()
            out.append(f"{shown:8} {e.check:{width}} {e.duration_s:7.2f}s  {figures}{why}")
        out.append(self.summary())
        return out

    def to_json(self, fingerprint: dict[str, Any], complete: bool = True) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": complete,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "duration_s": round(time.time() - self.started, 3), "totals": self.totals(),
                "kinds": self.kinds(), "tests": self.test_totals(), "summary": self.summary(),
                "fingerprint": fingerprint, "checks": [vars(e) for e in self.entries]}

    def write(self, path: str | Path, fingerprint: dict[str, Any], complete: bool = True) -> None:
        """Atomic write. Written after every check too (complete=False), so that a run killed by
        a CI timeout still leaves the figures of every check it finished."""
        atomic_write(path, json.dumps(self.to_json(fingerprint, complete), indent=1, default=str))


def _kind_total(kind: str, k: dict[str, int]) -> str:
    others = ", ".join(f"{k[o]} {SAID.get(o, o)}" for o in OUTCOMES if k[o] and o != "passed")
    if kind == "refusal":
        return f"{k['passed']} rule refusals confirmed" + (f" ({others})" if others else "")
    if kind == "setup":
        return f"{k['checks']} setup checks: " + ", ".join(
            f"{k[o]} {SAID.get(o, o)}" for o in OUTCOMES if k[o] or o in ("passed", "failed"))
    return f"{k['checks']} failing tests outside the checks"


def _short(value: Any, width: int = 60) -> str:
    text = str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


