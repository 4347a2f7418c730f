"""The determinism report: what each check measured, collected from test reports (so it works
under pytest-xdist: workers attach records to their reports, the controller merges them),
printed as a terminal summary section and written as JSON with --miles-report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY = "miles_check"


@dataclass
class Entry:
    nodeid: str
    check: str
    outcome: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collector:
    entries: list[Entry] = field(default_factory=list)

    def add_report(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            for name, value in getattr(report, "user_properties", ()):
                if name == KEY:
                    outcome = report.outcome
                    if hasattr(report, "wasxfail"):  # a known limitation (XFAIL) or its unexpected pass (XPASS)
                        outcome = "xfailed" if report.skipped else "xpassed"
                    self.entries.append(Entry(report.nodeid, value["check"], outcome, value.get("figures", {})))

    def lines(self) -> list[str]:
        out = []
        width = max((len(e.check) for e in self.entries), default=10)
        for e in self.entries:
            figures = ", ".join(f"{k}={v}" for k, v in e.figures.items())
            out.append(f"{e.outcome.upper():8} {e.check:{width}}  {figures}")
        counts = {o: sum(e.outcome == o for e in self.entries) for o in ("passed", "failed", "skipped", "xfailed",
                                                                          "xpassed")}
        known = "".join(f", {counts[o]} {o}" for o in ("xfailed", "xpassed") if counts[o])
        out.append(f"{len(self.entries)} determinism checks: {counts['passed']} passed, {counts['failed']} failed, "
                   f"{counts['skipped']} skipped{known}")
        return out

    def write(self, path: str | Path, fingerprint: dict[str, Any], complete: bool = True) -> None:
        """Atomic write. Written after every check too (complete=False), so that a run killed by
        a CI timeout still leaves the figures of every check it finished."""
        data = {"fingerprint": fingerprint, "complete": complete,
                "checks": [vars(e) for e in self.entries]}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
