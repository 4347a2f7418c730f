"""Which verdicts changed between two runs: two pytest-miles reports (`--miles-report` JSON) compared
check by check, keyed by test and check, on outcome and kind (`pytest-miles verdicts OLD NEW`).

"Every verdict unchanged" is what a change that only makes the suite faster must show, and what a
nightly run shows against the last good one. A reason that differs only in measured numbers (seconds,
counts, hashes) or in the GPU's name is the same reason. One that differs otherwise is listed, but the
verdict still holds: the outcome and kind decide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.errors import InputError

SCHEMA = "pytest-miles/report"
_NUMBERS = re.compile(r"0x[0-9a-f.p+-]+|[0-9a-f]{12,}|[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)
Key = tuple[str, str]


@dataclass
class Report:
    path: str
    complete: bool
    gpu: str
    checks: dict[Key, dict[str, str]]


def read_report(path: str) -> Report:
    """A report file, checked field by field: InputError naming the file and what is accepted."""
    from pytest_miles._files import load_json

    data = load_json(path, "a pytest-miles report (--miles-report JSON)")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("checks"), list):
        raise InputError(f"{path}: not a pytest-miles report; expected a JSON object with \"schema\": \"{SCHEMA}\" "
                         "and a \"checks\" list (the file --miles-report writes)")
    checks: dict[Key, dict[str, str]] = {}
    for i, c in enumerate(data["checks"]):
        fields = ("nodeid", "check", "outcome", "kind")
        if not isinstance(c, dict) or not all(isinstance(c.get(f), str) for f in fields) \
                or not isinstance(c.get("reason", ""), str):
            raise InputError(f"{path}: checks[{i}] is not a check record; expected an object with string fields "
                             f"{', '.join(fields)} and reason")
        key = (c["nodeid"], c["check"])
        if key in checks:
            raise InputError(f"{path}: checks[{i}] repeats test {c['nodeid']!r}, check {c['check']!r}; a report "
                             "holds each check once")
        checks[key] = {"outcome": c["outcome"], "kind": c["kind"], "reason": c.get("reason", "")}
    fingerprint = data.get("fingerprint")
    gpu = fingerprint.get("gpu_name") if isinstance(fingerprint, dict) else None
    return Report(path, data.get("complete") is True, gpu if isinstance(gpu, str) else "", checks)


def _shape(reason: str, gpu: str) -> str:
    """A reason with its GPU's name and its numbers (times, counts, hashes) masked."""
    return _NUMBERS.sub("#", reason.replace(gpu, "<gpu>") if gpu else reason)


@dataclass
class VerdictDiff:
    old: Report
    new: Report
    changed: list[tuple[Key, dict[str, str], dict[str, str]]] = field(default_factory=list)
    reworded: list[tuple[Key, str, str]] = field(default_factory=list)
    missing: list[tuple[Key, dict[str, str]]] = field(default_factory=list)
    added: list[tuple[Key, dict[str, str]]] = field(default_factory=list)
    same: int = 0
    subset: bool = False  # the new run selected some of the old one's tests: `missing` is no change

    @property
    def unchanged(self) -> bool:
        return not (self.changed or self.added or (self.missing and not self.subset))

    def render(self) -> str:
        def name(key: Key) -> str:
            return key[1] if key[1] == key[0] else f"{key[1]}  [{key[0]}]"

        total = len(self.new.checks)
        head = (f"{'every verdict unchanged' if self.unchanged else 'verdicts changed'}: {self.same} of {total} "
                f"checks of {self.new.path} have the outcome and kind they have in {self.old.path}")
        lines = [head]
        lines += [f"changed   {name(k)}: {a['outcome']} ({a['kind']}) -> {b['outcome']} ({b['kind']})"
                  + (f": {b['reason'].splitlines()[0][:200]}" if b["reason"] else "") for k, a, b in self.changed]
        if self.subset and self.missing:
            lines.append(f"not selected in the new run (--subset): {len(self.missing)} of the old report's checks")
        else:
            lines += [f"missing   {name(k)}: {a['outcome']} ({a['kind']}) in the old report only"
                      for k, a in self.missing]
        lines += [f"added     {name(k)}: {b['outcome']} ({b['kind']}) in the new report only" for k, b in self.added]
        lines += [f"reworded  {name(k)} (same verdict): "
                  f"{_first_difference(_shape(a, self.old.gpu), _shape(b, self.new.gpu))}" for k, a, b in self.reworded]
        for r in (self.old, self.new):
            if not r.complete:
                lines.append(f"note: {r.path} is incomplete (its session did not end): checks it never reached are "
                             "missing from it")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def rec(key: Key) -> dict[str, str]:
            return {"nodeid": key[0], "check": key[1]}

        return {"unchanged": self.unchanged, "same": self.same, "subset": self.subset, "old": self.old.path,
                "new": self.new.path,
                "complete": {"old": self.old.complete, "new": self.new.complete},
                "changed": [{**rec(k), "old": a, "new": b} for k, a, b in self.changed],
                "missing": [{**rec(k), "old": a} for k, a in self.missing],
                "added": [{**rec(k), "new": b} for k, b in self.added],
                "reworded": [{**rec(k), "old": a, "new": b} for k, a, b in self.reworded]}


def _first_difference(a: str, b: str, before: int = 30, after: int = 70) -> str:
    """Where two reasons part (numbers masked as #): a few words before the first differing character,
    then each side."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - before)
    lead = "..." if start else ""
    return f"{lead}{a[start:i + after]!r} -> {lead}{b[start:i + after]!r}"


def compare_verdicts(old: Report, new: Report, subset: bool = False) -> VerdictDiff:
    """`new`'s checks against `old`'s: outcome and kind decide; `subset`: the new run selected some of
    the old one's tests, so checks only `old` has are not changes."""
    diff = VerdictDiff(old, new, subset=subset)
    for key, b in new.checks.items():
        a = old.checks.get(key)
        if a is None:
            diff.added.append((key, b))
        elif (a["outcome"], a["kind"]) != (b["outcome"], b["kind"]):
            diff.changed.append((key, a, b))
        else:
            diff.same += 1
            if _shape(a["reason"], old.gpu) != _shape(b["reason"], new.gpu):
                diff.reworded.append((key, a["reason"], b["reason"]))
    diff.missing = [(key, a) for key, a in old.checks.items() if key not in new.checks]
    return diff
