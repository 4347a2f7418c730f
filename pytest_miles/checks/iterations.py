"""First diverging iteration of two runs: the Miles reproducibility guide's troubleshooting starts from "hashes diverge
after iter 1", so the walk compares every iteration both runs saved, in order, and stops at the
first that differs, naming its first differing tensor and the guide's likely cause."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.checks.compare import compare_checkpoints
from pytest_miles.checks.compare_report import Report
from pytest_miles.ckpt.model import listdir, resolve_path
from pytest_miles.errors import CheckpointError
from pytest_miles.facts import troubleshooting

__all__ = ["IterationWalk", "first_diverging_iteration", "saved_iterations"]

_ITER = re.compile(r"^iter_(\d{7})$")


def _hint(stage: str) -> str:
    """The troubleshooting row (facts/troubleshooting.toml) of where the divergence shows."""
    row = troubleshooting.for_stage(stage)[0]
    source = "the Miles reproducibility guide's troubleshooting: " if row.guide else ""
    return f"{source}{row.arrow()}; fix: {row.fix}; run `pytest-miles doctor`"


def saved_iterations(run: str | os.PathLike) -> dict[int, Path]:
    """{iteration: iter_XXXXXXX dir} of a Megatron save dir (also `release`, as -1: never walked)."""
    root = resolve_path(Path(run))
    if not root.is_dir():
        raise CheckpointError(f"{run}: --iterations all needs a run directory holding iter_XXXXXXX/ dirs")
    out = {int(m.group(1)): p for p in listdir(root) if (m := _ITER.match(p.name)) and p.is_dir()}
    if not out:
        raise CheckpointError(f"{run}: no iter_XXXXXXX/ directories (a Megatron save dir is expected for "
                              "--iterations all)")
    return out


@dataclass
class IterationWalk:
    a: str
    b: str
    compared: list[int] = field(default_factory=list)
    only_a: list[int] = field(default_factory=list)
    only_b: list[int] = field(default_factory=list)
    first_diverging: int | None = None
    report: Report | None = None  # of the first diverging iteration

    @property
    def passed(self) -> bool:
        return self.first_diverging is None and bool(self.compared)

    @property
    def equal(self) -> bool:
        """The old name of `passed` (read-only)."""
        return self.passed

    @property
    def first_tensor(self) -> str | None:
        return self.report.first.name if self.report is not None and self.report.first else None

    def hint(self) -> str | None:
        if self.first_diverging is None:
            return None
        earlier = [i for i in self.compared if i < self.first_diverging]
        return _hint("after_first" if earlier else "from_first")

    def render(self) -> str:
        if not self.compared:
            head = "runs share no saved iteration"
        elif self.first_diverging is None:
            head = f"runs EQUAL at every iteration both saved ({', '.join(map(str, self.compared))})"
        else:
            equal = [i for i in self.compared if i < self.first_diverging]
            head = (f"runs DIVERGE: first diverging iteration {self.first_diverging}, first differing tensor "
                    f"{self.first_tensor}" + (f" (equal at {', '.join(map(str, equal))})" if equal else ""))
        lines = [head, f"  A: {self.a}", f"  B: {self.b}"]
        if self.only_a:
            lines.append(f"  iterations saved by A only: {', '.join(map(str, self.only_a))}")
        if self.only_b:
            lines.append(f"  iterations saved by B only: {', '.join(map(str, self.only_b))}")
        if self.hint():
            lines.append(f"  {self.hint()}")
        if self.report is not None:
            lines.append(f"iteration {self.first_diverging}:")
            lines.extend("  " + line for line in self.report.render().splitlines())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"equal": self.passed, "a": self.a, "b": self.b, "iterations_compared": self.compared,
                "only_a": self.only_a, "only_b": self.only_b, "first_diverging_iteration": self.first_diverging,
                "first_difference": self.first_tensor, "hint": self.hint(),
                "report": self.report.to_json() if self.report is not None else None}


def first_diverging_iteration(a: str | os.PathLike, b: str | os.PathLike, *, ignore: tuple[str, ...] | list[str] = (),
                              workers: int | None = None) -> IterationWalk:
    """Compare the iterations both runs saved, in order; stop at the first that differs."""
    ia, ib = saved_iterations(a), saved_iterations(b)
    walk = IterationWalk(str(a), str(b), only_a=sorted(set(ia) - set(ib)), only_b=sorted(set(ib) - set(ia)))
    for it in sorted(set(ia) & set(ib)):
        report = compare_checkpoints(ia[it], ib[it], ignore=ignore, workers=workers)
        walk.compared.append(it)
        if not report.passed:
            walk.first_diverging, walk.report = it, report
            break
    return walk
