"""Routing determinism: two routing records (the experts each token went to in each MoE layer)
compared token by token, layer by layer. The first difference names the token, the layer and the
experts each side chose; where either side's router scored the last chosen expert and the first
left out exactly equal, the difference is a tie (top-k's pick between equal scores), not a
divergence of the router's input, and the report says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_miles.errors import InputError
from pytest_miles.models.routing import RoutingRecord
from pytest_miles.recording import recorded

__all__ = ["RoutingDifference", "RoutingReport", "assert_routing_equal", "compare_routing", "first_routing_difference"]


@dataclass(frozen=True)
class RoutingDifference:
    token: int
    layer: int
    experts_a: tuple[int, ...]
    experts_b: tuple[int, ...]
    tie: bool = False
    tie_note: str = ""

    @property
    def only_a(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.experts_a) - set(self.experts_b)))

    @property
    def only_b(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.experts_b) - set(self.experts_a)))

    def render(self, a: str = "a", b: str = "b") -> str:
        text = (f"token {self.token}, layer {self.layer}: {a} chose experts {list(self.experts_a)}, {b} chose "
                f"{list(self.experts_b)} (expert {', '.join(map(str, self.only_a))} vs "
                f"{', '.join(map(str, self.only_b))})")
        return text + (f"; a TIE in router scores: {self.tie_note}" if self.tie else "")


@dataclass
class RoutingReport:
    a: str
    b: str
    tokens: int
    layers: int
    differences: list[RoutingDifference] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.differences

    @property
    def first(self) -> RoutingDifference | None:
        return self.differences[0] if self.differences else None

    @property
    def ties(self) -> int:
        return sum(d.tie for d in self.differences)

    def render(self, limit: int = 5) -> str:
        total = self.tokens * self.layers
        head = (f"routing {self.a} vs {self.b}: {'PASS' if self.passed else 'FAIL'}; {self.tokens} tokens x "
                f"{self.layers} MoE layers, {len(self.differences)} of {total} routing decisions differ"
                + (f" ({self.ties} of them ties in router scores)" if self.ties else ""))
        lines = [head]
        if self.first is not None:
            lines.append("  first difference: " + self.first.render(self.a, self.b))
        lines += ["  - " + d.render(self.a, self.b) for d in self.differences[1:limit]]
        if len(self.differences) > limit:
            lines.append(f"  ... and {len(self.differences) - limit} more")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        f = self.first
        return {"a": self.a, "b": self.b, "passed": self.passed, "tokens": self.tokens, "layers": self.layers,
                "differences": len(self.differences), "ties": self.ties,
                "first_token": None if f is None else f.token, "first_layer": None if f is None else f.layer,
                "first_tie": None if f is None else f.tie}


def _tie(record: RoutingRecord, token: int, layer: int, side: str) -> str:
    """A note when this side's router scored its last chosen expert equal to the best one left out."""
    if record.scores is None:
        return ""
    scores = record.scores[token][layer]
    chosen = record.experts[token][layer]
    rest = [e for e in range(len(scores)) if e not in chosen]
    if not chosen or not rest:
        return ""
    low = min(chosen, key=lambda e: scores[e])
    high = max(rest, key=lambda e: scores[e])
    if scores[low] == scores[high]:
        return f"{side}'s router scored expert {low} (chosen) and expert {high} (left out) equal ({scores[low]!r})"
    return ""


def _check_pair(a: RoutingRecord, b: RoutingRecord) -> None:
    for name, r in (("a", a), ("b", b)):
        if not isinstance(r, RoutingRecord):
            raise InputError(f"routing {name}: {type(r).__name__} is not accepted; expected a RoutingRecord "
                             "(ReferenceEngine.routing, a trainer's routing record)")
    if (a.num_tokens, a.num_layers) != (b.num_tokens, b.num_layers):
        raise InputError(f"routing records of different shapes: {a.source} has {a.num_tokens} tokens x "
                         f"{a.num_layers} layers, {b.source} {b.num_tokens} x {b.num_layers}; expected the "
                         "same tokens through the same model")
    if a.tokens is not None and b.tokens is not None and a.tokens != b.tokens:
        i = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
        raise InputError(f"routing records of different token ids (first at position {i}: {a.tokens[i]} vs "
                         f"{b.tokens[i]}); routing is compared on the same tokens")


def compare_routing(a: RoutingRecord, b: RoutingRecord) -> RoutingReport:
    """Every (token, layer) whose chosen experts differ, in token order then layer order (the
    first is the earliest token, and within it the first layer: where the change began)."""
    _check_pair(a, b)
    report = RoutingReport(a.source, b.source, a.num_tokens, a.num_layers)
    for t in range(a.num_tokens):
        for n in range(a.num_layers):
            ea, eb = tuple(sorted(a.experts[t][n])), tuple(sorted(b.experts[t][n]))
            if ea != eb:
                note = "; ".join(x for x in (_tie(a, t, n, a.source), _tie(b, t, n, b.source)) if x)
                report.differences.append(RoutingDifference(t, n, ea, eb, bool(note), note))
    return report


def first_routing_difference(a: RoutingRecord, b: RoutingRecord) -> RoutingDifference | None:
    """The earliest token (then layer) whose experts differ, or None when every decision agrees."""
    return compare_routing(a, b).first


@recorded("routing equal")
def assert_routing_equal(a: RoutingRecord, b: RoutingRecord) -> RoutingReport:
    """Raise AssertionError with the report unless every token went to the same experts in every
    layer on both sides; a tie in router scores is named as such."""
    report = compare_routing(a, b)
    if report.tokens == 0 or report.layers == 0:
        raise AssertionError(f"routing {a.source} vs {b.source}: vacuous, the records hold no routing decision")
    if not report.passed:
        raise AssertionError(report.render())
    return report
