"""The cost of determinism, measured honestly: throughput with and without the flag in pairs
whose order alternates (so slow drift of clocks or caches does not favour one side), reported as
the median of the per-pair costs with their spread, next to what the seed expects. A figure whose
spread covers zero says nothing about the sign of the cost: it is "inconclusive", never a pass."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.errors import Inconclusive

EXPECTED_COST = {  # the costs the Miles reproducibility guide expects
    "rollout": "-10% to -15% (SGLang deterministic)", "training": "-3% to -8% (Megatron deterministic mode)"}
SEED_COST = EXPECTED_COST  # the earlier name


def spread_verdict(values: list[float], claim: float = 0.0) -> str:
    """ "measured" when every value lies on one side of `claim` (the spread does not cover it),
    else "inconclusive"; fewer than 3 values cannot show a spread and are inconclusive too."""
    if len(values) < 3 or min(values) <= claim <= max(values):
        return "inconclusive"
    return "measured"


def raise_if_inconclusive(label: str, figures: dict[str, Any], values: list[float],
                          claim: float = 0.0) -> None:
    """Record the figure as "inconclusive" and skip the test when its spread covers `claim`:
    a noisy figure is said as noise, not reported as a pass."""
    if spread_verdict(values, claim) == "measured":
        return
    from pytest_miles import recording

    lo, hi = min(values, default=claim), max(values, default=claim)
    message = (f"inconclusive: {label}: spread {lo * 100:+.1f}%..{hi * 100:+.1f}% over {len(values)} pairs "
               f"covers {claim * 100:+.1f}%, so the figure is noise here (a quieter machine or more pairs "
               "can decide it)")
    recording.record(label, "inconclusive", {**figures, "message": message})
    raise Inconclusive(message)


@dataclass
class CostReport:
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (deterministic tok/s, baseline tok/s)

    @property
    def costs(self) -> list[float]:
        return [d / b - 1 for d, b in self.pairs]

    @property
    def median(self) -> float:
        return statistics.median(self.costs)

    def figures(self) -> dict[str, Any]:
        c = self.costs
        return {"cost_median": f"{self.median * 100:+.1f}%",
                "cost_spread": f"{min(c) * 100:+.1f}%..{max(c) * 100:+.1f}%",
                "verdict": spread_verdict(c), "pairs": len(self.pairs),
                "deterministic_tok_s": [round(d, 1) for d, _ in self.pairs],
                "baseline_tok_s": [round(b, 1) for _, b in self.pairs], "seed_expects": EXPECTED_COST["rollout"]}


def _tokens_per_second(engine, prompts, params) -> float:
    """One timed batch from a cold prefix cache: SGLang turns its radix cache off for flashinfer in
    deterministic mode only, so a warm cache would favour the baseline."""
    engine.flush_cache()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.output_ids) for o in outs) / dt


def measure_rollout_cost(deterministic, baseline, prompts, params, pairs: int = 3) -> CostReport:
    """Tokens/s of both engines, `pairs` interleaved pairs (>= 3), after one warm-up batch each."""
    if pairs < 3:
        raise ValueError(f"pairs: {pairs} < 3 (a median with a spread needs at least 3 pairs)")
    deterministic.generate(prompts, params)
    baseline.generate(prompts, params)
    report = CostReport()
    for i in range(pairs):
        if i % 2 == 0:
            d = _tokens_per_second(deterministic, prompts, params)
            b = _tokens_per_second(baseline, prompts, params)
        else:
            b = _tokens_per_second(baseline, prompts, params)
            d = _tokens_per_second(deterministic, prompts, params)
        report.pairs.append((d, b))
    return report
