"""The divergence locator over per-layer records: given two sides that should agree, the first
place they do not and how the gap grows. (b) an engine and a trainer on the same tokens: hidden
states per decoder layer and sublayer (input norm, attention, post-attention norm, MLP, layer
output), mapped by canonical names; (a) two trainer runs: per step, module outputs in forward and
gradients in backward, so "checkpoints differ after step 3" becomes "step 3, backward, layer 5 mlp".
Records come from engines and trainers on request (ReferenceEngine.hidden_states, the trainer
session's trace); this module never launches anything. docs/parity.md."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.errors import InputError

SUBLAYERS = ("input_norm", "attention", "post_attention_norm", "mlp", "output")
_LAYER = re.compile(r"^layers\.(\d+)\.(\w+)$")


def canonical_order(names: list[str] | set[str]) -> list[str]:
    """Forward order of canonical names: embedding, per layer its sublayers, final_norm, logits."""
    def rank(name: str) -> tuple:
        m = _LAYER.match(name)
        if m:
            sub = m.group(2)
            return (1, int(m.group(1)), SUBLAYERS.index(sub) if sub in SUBLAYERS else len(SUBLAYERS), sub)
        return ({"embedding": 0, "final_norm": 2, "logits": 3}.get(name, 4), 0, 0, name)

    return sorted(names, key=rank)


def pretty(name: str) -> str:
    """'layers.5.mlp' -> 'layer 5 mlp'."""
    m = _LAYER.match(name)
    return f"layer {m.group(1)} {m.group(2).replace('_', ' ')}" if m else name.replace("_", " ")


@dataclass
class LayerProfile:
    """Per compared point (in forward order): max and mean |a - b|, bitwise equal or not."""

    sides: tuple[str, str]
    rows: list[dict[str, Any]]
    tolerance: float
    only_one_side: list[str] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["max_abs"] > self.tolerance), None)

    def answer(self) -> str:
        first = self.first
        if first is None:
            equal = sum(r["equal"] for r in self.rows)
            within = f" within {self.tolerance:g}" if self.tolerance else ""
            return (f"{self.sides[0]} and {self.sides[1]} agree{within} at every one of {len(self.rows)} points "
                    f"({equal} bitwise equal)")
        before = self.rows[self.rows.index(first) - 1]["name"] if self.rows.index(first) else None
        grow = [r["max_abs"] for r in self.rows[self.rows.index(first):]]
        return (f"first differs at {pretty(first['name'])} (max |delta| {first['max_abs']:.3g}"
                + (f"; {pretty(before)} before it agrees" if before else "")
                + f"); grows to {grow[-1]:.3g} at {pretty(self.rows[-1]['name'])}")

    def render(self) -> str:
        lines = [f"divergence locator, {self.sides[0]} vs {self.sides[1]}: {self.answer()}",
                 f"{'point':28} {'max |delta|':>12} {'mean |delta|':>12}  bitwise"]
        first = self.first
        for r in self.rows:
            mark = "  <- first" if r is first else ""
            lines.append(f"{pretty(r['name']):28} {r['max_abs']:12.4g} {r['mean_abs']:12.4g}  "
                         f"{'equal' if r['equal'] else 'differs'}{mark}")
        if self.only_one_side:
            lines.append(f"(not compared, on one side only: {', '.join(map(pretty, self.only_one_side[:8]))})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"sides": list(self.sides), "rows": self.rows, "tolerance": self.tolerance,
                "first": self.first["name"] if self.first else None, "answer": self.answer(),
                "only_one_side": self.only_one_side}


def _diff(a, b, name: str) -> dict[str, Any]:
    import torch

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise InputError(f"locator: {name}: shapes {list(a.shape)} and {list(b.shape)} (not the same tokens? the "
                         "records must be [tokens, hidden] of one sequence on both sides)")
    d = (a.double() - b.double()).abs()
    return {"name": name, "max_abs": float(d.max()) if d.numel() else 0.0,
            "mean_abs": float(d.mean()) if d.numel() else 0.0, "equal": bool(torch.equal(a, b))}


def profile_layers(a: dict[str, Any], b: dict[str, Any], *, sides: tuple[str, str] = ("engine", "trainer"),
                   tolerance: float = 0.0) -> LayerProfile:
    """Compare two per-point records ({canonical name: tensor}) over the names both have, in forward
    order; `tolerance`: the |delta| under which a point still agrees (0: bitwise)."""
    common = canonical_order(set(a) & set(b))
    if not common:
        raise InputError(f"locator: the two records share no point (names {sorted(a)[:4]} vs {sorted(b)[:4]})")
    rows = [_diff(a[n], b[n], n) for n in common]
    return LayerProfile(sides, rows, tolerance, canonical_order(set(a) ^ set(b)))


@dataclass
class StepDivergence:
    """Where two trainer runs first differ: step (1-based), phase (forward/backward), point."""

    step: int | None
    phase: str | None
    profile: LayerProfile | None
    steps: int

    def answer(self) -> str:
        if self.step is None:
            return f"the two runs agree at every point of {self.steps} steps, forward and backward"
        first = self.profile.first if self.profile else None
        where = pretty(first["name"]) if first else "?"
        return f"step {self.step}, {self.phase}, {where} first differs (max |delta| {first['max_abs']:.3g})"


def locate_in_steps(run_a: list[dict[str, dict[str, Any]]], run_b: list[dict[str, dict[str, Any]]], *,
                    tolerance: float = 0.0, order: list[list[str]] | None = None) -> StepDivergence:
    """Per step ({"forward": {name: tensor}, "backward": {name: tensor}}), the first step and phase
    where the runs differ and the first point there: forward in forward order; backward in the order
    the gradients were computed (`order[step]`, the backward hooks' firing order, else reverse forward)."""
    if len(run_a) != len(run_b):
        raise InputError(f"locator: {len(run_a)} steps recorded in one run, {len(run_b)} in the other")
    for i, (sa, sb) in enumerate(zip(run_a, run_b)):
        for phase in ("forward", "backward"):
            a, b = sa.get(phase, {}), sb.get(phase, {})
            if not a and not b:
                continue
            prof = profile_layers(a, b, sides=("run a", "run b"), tolerance=tolerance)
            if phase == "backward":
                seq = order[i] if order else list(reversed([r["name"] for r in prof.rows]))
                by = {r["name"]: r for r in prof.rows}
                prof.rows = [by[n] for n in seq if n in by]
            if prof.first is not None:
                return StepDivergence(i + 1, phase, prof, len(run_a))
    return StepDivergence(None, None, None, len(run_a))
