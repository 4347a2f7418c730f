"""What `compare` reports: the differences found, in checkpoint order, and the notes.

Kept apart from the comparison itself so that the native fast path (dcp_fast.py) can build the
same report without importing the full comparison (process start is part of what users wait for).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Difference", "Report", "merge_notes"]


class _Record:
    """Plain records (not dataclasses: `dataclasses` imports `inspect`, 5 ms of every `compare`)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class Difference(_Record):
    __slots__ = ("kind", "name", "detail", "order", "data")

    def __init__(self, kind: str, name: str, detail: str, order: int = 1 << 62,
                 data: dict[str, Any] | None = None) -> None:
        self.kind = kind  # tensor | missing | extra | dtype | shape | metadata | object | file
        self.name, self.detail, self.order, self.data = name, detail, order, data

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail,
                **({"diff": self.data} if self.data else {})}


class Report(_Record):
    __slots__ = ("a", "b", "kind_a", "kind_b", "tensors_compared", "bytes_compared", "seconds", "differences",
                 "notes", "ignored", "ignored_unmatched", "stopped_early")

    def __init__(self, a: str, b: str, kind_a: str, kind_b: str, tensors_compared: int = 0, bytes_compared: int = 0,
                 seconds: float = 0.0, differences: list[Difference] | None = None, notes: list[str] | None = None,
                 ignored: list[str] | None = None, ignored_unmatched: list[str] | None = None,
                 stopped_early: bool = False) -> None:
        self.a, self.b, self.kind_a, self.kind_b = a, b, kind_a, kind_b
        self.tensors_compared, self.bytes_compared, self.seconds = tensors_compared, bytes_compared, seconds
        self.differences = differences if differences is not None else []
        self.notes = notes if notes is not None else []
        self.ignored = ignored if ignored is not None else []
        self.ignored_unmatched = ignored_unmatched if ignored_unmatched is not None else []
        self.stopped_early = stopped_early

    @property
    def passed(self) -> bool:
        """Every compared tensor and value bitwise equal (the verdict; JSON key "equal")."""
        return not self.differences

    @property
    def equal(self) -> bool:
        """The old name of `passed` (read-only)."""
        return self.passed

    @property
    def first(self) -> Difference | None:
        return min(self.differences, key=lambda d: d.order) if self.differences else None

    def render(self) -> str:
        rate = self.bytes_compared / self.seconds / 1e9 if self.seconds else 0.0
        head = "EQUAL" if self.passed else f"DIFFERENT ({len(self.differences)} difference(s))"
        lines = [f"checkpoints {head}", f"  A: {self.a} [{self.kind_a}]", f"  B: {self.b} [{self.kind_b}]",
                 f"  compared {self.tensors_compared} items, {self.bytes_compared / 2**20:.1f} MiB in "
                 f"{self.seconds:.2f} s ({rate:.2f} GB/s)"]
        if self.first is not None:
            lines.append(f"  first difference in checkpoint order: {self.first.name}")
        for d in sorted(self.differences, key=lambda d: d.order):
            lines.append(f"  - [{d.kind}] {d.detail}")
        if self.stopped_early:
            lines.append("  (stopped at the first difference: --first)")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.ignored:
            lines.append(f"  ignored by request: {', '.join(self.ignored)}")
        if self.ignored_unmatched:
            lines.append(f"  ignore pattern(s) that matched nothing: {', '.join(self.ignored_unmatched)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "equal": self.passed, "a": self.a, "b": self.b, "kind_a": self.kind_a, "kind_b": self.kind_b,
            "tensors_compared": self.tensors_compared, "bytes_compared": self.bytes_compared,
            "seconds": self.seconds, "first_difference": self.first.name if self.first else None,
            "differences": [d.to_json() for d in sorted(self.differences, key=lambda d: d.order)],
            "notes": self.notes, "ignored": self.ignored, "ignored_unmatched": self.ignored_unmatched,
            "stopped_early": self.stopped_early,
        }


def merge_notes(notes_a: list[str], notes_b: list[str]) -> list[str]:
    """Both sides' notes: one line for a note both carry, "A: " / "B: " for a note of one side."""
    return [n if n in notes_b else f"A: {n}" for n in notes_a] + [f"B: {n}" for n in notes_b if n not in notes_a]
