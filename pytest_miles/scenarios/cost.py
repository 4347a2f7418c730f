"""The cost of determinism, measured honestly: throughput with and without the flag in pairs
whose order alternates (so slow drift of clocks or caches does not favour one side), reported as
the median of the per-pair costs with their spread, next to what the seed expects. A figure whose
pairs do not show the sign of the cost (spread_verdict: the spread covers zero; sign_verdict: a sign test
could put the split down to chance) is "inconclusive", never a pass."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
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


# The false-"measured" rate of the training figure's first rule, 6 of 6 pairs on one side of zero when the
# two sides cost the same: 2 / 2**6. sign_verdict keeps that level for any number of pairs.
SIGN_LEVEL = 2 / 2 ** 6


def sign_p(values: list[float], claim: float = 0.0) -> float:
    """Two-sided sign-test p-value of `values` against `claim`: the chance, were each value as likely
    above `claim` as below it, of a split at least this lopsided (a value equal to `claim` counts against)."""
    n = len(values)
    above = sum(v > claim for v in values)
    below = sum(v < claim for v in values)
    against = n - max(above, below)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(against + 1)) / 2 ** n) if n else 1.0


def sign_verdict(values: list[float], claim: float = 0.0, level: float = SIGN_LEVEL) -> str:
    """ "measured" when the pairs fall on one side of `claim` so lopsidedly that chance would do it at
    most `level` of the time (a sign test): with 10 pairs, 9 on one side (p = 0.021); with 6, all of
    them (p = 0.031). One outlier among many pairs then no longer hides a clear sign, and a false
    "measured" is no likelier than under spread_verdict's 6 of 6. Else "inconclusive"."""
    return "measured" if len(values) >= 3 and sign_p(values, claim) <= level else "inconclusive"


def spread_text(values: list[float], empty: float = 0.0) -> str:
    """The lowest..highest of per-pair costs in percent (`empty` for both ends when there are none)."""
    return f"{min(values, default=empty) * 100:+.1f}%..{max(values, default=empty) * 100:+.1f}%"


def _check_pairs(pairs: int) -> None:
    if pairs < 3:
        raise ValueError(f"pairs: {pairs} < 3 (a median with a spread needs at least 3 pairs)")


def _noise(values: list[float], claim: float, rule: Callable[..., str]) -> str:
    spread = f"spread {spread_text(values, claim)} over {len(values)} pairs"
    if rule is sign_verdict:
        side = max(sum(v > claim for v in values), sum(v < claim for v in values))
        return (f"{side} of {len(values)} pairs on one side of {claim * 100:+.1f}% (sign test p = "
                f"{sign_p(values, claim):.3f}, above {SIGN_LEVEL:.3f}); {spread}")
    return f"{spread} covers {claim * 100:+.1f}%"


def raise_if_inconclusive(label: str, figures: dict[str, Any], values: list[float],
                          claim: float = 0.0, rule: Callable[..., str] = spread_verdict) -> None:
    """Record the figure as "inconclusive" and skip the test when `rule` (spread_verdict: the spread
    covers `claim`; sign_verdict: the pairs' sides could be chance) says so: a noisy figure is said as
    noise, not reported as a pass."""
    if rule(values, claim) == "measured":
        return
    from pytest_miles import recording

    message = (f"inconclusive: {label}: {_noise(values, claim, rule)}, so the figure is noise here (a quieter "
               "machine or more pairs can decide it)")
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
                "cost_spread": spread_text(c),
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


def interleaved(deterministic: Callable[[], float], baseline: Callable[[], float],
                pairs: int) -> list[tuple[float, float]]:
    """`pairs` (deterministic, baseline) measurements, taken in an order that alternates (D B, B D, D B, ...),
    so that load that rises or falls over the measurement (a kernel build, a process starting beside it)
    weighs on both sides alike instead of on whichever ran second. `pairs` >= 3: a median with a spread."""
    _check_pairs(pairs)
    out = []
    for i in range(pairs):
        if i % 2 == 0:
            d = deterministic()
            b = baseline()
        else:
            b = baseline()
            d = deterministic()
        out.append((d, b))
    return out


def measure_rollout_cost(deterministic, baseline, prompts, params, pairs: int = 3) -> CostReport:
    """Tokens/s of both engines, `pairs` interleaved pairs (>= 3), after one warm-up batch each."""
    _check_pairs(pairs)
    deterministic.generate(prompts, params)
    baseline.generate(prompts, params)
    return CostReport(pairs=interleaved(lambda: _tokens_per_second(deterministic, prompts, params),
                                        lambda: _tokens_per_second(baseline, prompts, params), pairs))


def measure_training_cost(trainer_factory: Callable[..., Any], steps: int = 8, warmup: int = 2,
                          pairs: int = 10) -> tuple[dict[str, Any], list[float]]:
    """The training step's cost of deterministic mode: `pairs` pairs of runs (one with deterministic
    mode, one without, same seed) in alternating order, each run's median step time after `warmup`
    steps. Returns the figures and the per-pair throughput costs (baseline time / deterministic time - 1),
    to be judged by sign_verdict."""
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup: {warmup} must be >= 0 and below steps ({steps})")

    def median_step(deterministic: bool) -> Callable[[], float]:
        def measure() -> float:
            run = trainer_factory(seed=1, deterministic=deterministic).train(steps)
            return statistics.median(run.step_times[warmup:])
        return measure

    timed = interleaved(median_step(True), median_step(False), pairs)
    costs = [b / d - 1 for d, b in timed]
    figures = {"deterministic_ms": round(statistics.median(d for d, _ in timed) * 1e3, 2),
               "baseline_ms": round(statistics.median(b for _, b in timed) * 1e3, 2),
               "cost": f"{statistics.median(costs) * 100:+.1f}% throughput",
               "cost_spread": spread_text(costs), "pairs": len(costs),
               "pairs_below_zero": sum(c < 0 for c in costs), "sign_p": round(sign_p(costs), 4),
               "order": "alternating (D B, B D, ...), one run each, median step time after the warm-up steps",
               "deterministic_run_ms": [round(d * 1e3, 2) for d, _ in timed],
               "baseline_run_ms": [round(b * 1e3, 2) for _, b in timed],
               "verdict": sign_verdict(costs), "seed_expects": EXPECTED_COST["training"]}
    return figures, costs
