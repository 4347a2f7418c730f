"""A weight sync that did something: after a sync, the served weights equal the trainer's LIVE
parameters (read from the trainer's model, not from what it sent) AND differ from the weights
served before the sync wherever the trainer's changed. A check of served == sent cannot see a
trainer that sends the wrong payload (the frozen initial model pushed on every sync, which
"masquerades as staleness": verl-project/verl#7495), nor an engine that skipped the update.
Reads the served weights through get_weights_by_name; never launches anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_miles.checks.served_weights import _bits, _served_tensor
from pytest_miles.errors import InputError


def read_served(engine: Any, shapes: dict[str, Any], rows: int | None = None) -> dict[str, Any]:
    """{HF name: float32 tensor} of every named tensor as the engine serves it now: every row, or
    the first `rows` (SGLang's truncate_size; the JSON answer of a 150k-row embedding is large)."""
    label = getattr(engine, "name", type(engine).__name__)
    out = {}
    for name, shape in shapes.items():
        if len(shape):
            shape = (min(int(shape[0]), rows or int(shape[0])), *shape[1:])
            out[name] = _served_tensor(engine.get_weights_by_name(name, shape[0]), shape, name, label)[0]
    return out


@dataclass
class SyncReport:
    iteration: int
    tensors: int
    changed: list[str] = field(default_factory=list)  # the trainer's parameters that changed since the last sync
    stale: list[str] = field(default_factory=list)  # changed in the trainer, served bits unchanged by the sync
    mismatch: list[str] = field(default_factory=list)  # served after the sync != the trainer's live parameters
    dtype: str = "float32"

    @property
    def passed(self) -> bool:
        return bool(self.changed) and not self.stale and not self.mismatch

    def render(self) -> str:
        head = f"iteration {self.iteration}: weight sync"
        if self.stale:
            return (f"{head} did nothing for {len(self.stale)} of the {len(self.changed)} tensors the trainer changed "
                    f"(first: {self.stale[0]}): the engine serves the weights it served before the sync (a stale or "
                    "skipped sync)")
        if self.mismatch:
            return (f"{head}: the served weights differ from the trainer's live parameters in {len(self.mismatch)} of "
                    f"{self.tensors} tensors (first: {self.mismatch[0]}): the payload sent is not what the trainer "
                    "holds (an old or initial state?), or the engine loaded it wrongly")
        if not self.changed:
            return f"{head}: the trainer changed none of {self.tensors} tensors: nothing shows the sync took effect"
        return (f"{head} took effect: {len(self.changed)} of {self.tensors} tensors changed in the trainer and in the "
                f"engine, served == the trainer's live parameters (in {self.dtype})")

    def to_json(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "tensors": self.tensors, "changed": len(self.changed),
                "stale": self.stale, "mismatch": self.mismatch, "dtype": self.dtype, "passed": self.passed}


def judge_sync(iteration: int, trainer_before: dict, trainer_after: dict, served_before: dict, served_after: dict,
               dtype: str = "float32") -> SyncReport:
    """Compare on the served dtype's bits (the trainer's fp32 cast to it, as the export does)."""
    import torch

    names = sorted(trainer_after)
    missing = [n for n in names if n not in served_after or n not in served_before or n not in trainer_before]
    if missing:
        raise InputError(f"judge_sync: {missing[0]!r} is in the trainer's parameters but not in every record "
                         "(trainer before, served before, served after)")
    to = getattr(torch, dtype)

    def cast(t, rows: int):  # the rows the engine was asked for, in the served dtype
        return t.detach().cpu()[:rows].to(to).to(torch.float32)

    report = SyncReport(iteration, len(names), dtype=dtype)
    for n in names:
        rows = len(served_after[n])
        after, before = cast(trainer_after[n], rows), cast(trainer_before[n], rows)
        if not torch.equal(_bits(after), _bits(before)):
            report.changed.append(n)
            if torch.equal(_bits(served_after[n].float()), _bits(served_before[n].float())):
                report.stale.append(n)
        if not torch.equal(_bits(served_after[n].float()), _bits(after)):
            report.mismatch.append(n)
    return report


def assert_sync_took_effect(report: SyncReport) -> SyncReport:
    """AssertionError naming the iteration and what the sync failed to do."""
    if report.stale or report.mismatch:
        raise AssertionError(report.render())
    return report
