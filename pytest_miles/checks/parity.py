"""Train-rollout parity over records: the same token ids scored by the rollout engine (the
logprobs it returned while decoding, and a prefill recompute) and by the trainer's forward on the
same weights. Semantics first (token shift, response mask, the selected token is the one sampled):
a mismatch there is an identity error, reported apart from numerical drift. Then the figures per
token and in aggregate: mean and max |delta|, the first generated token apart from the rest, by
policy-confidence bucket, K3-KL, bitwise-equal tokens, by position. Never launches anything
(scenarios/parity.py does); docs/parity.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.capabilities.parity_budgets import PAIRS, Budget, find_budget, key_text
from pytest_miles.errors import InputError, Unbudgeted
from pytest_miles.recording import recorded

# policy confidence = the rollout's probability of the sampled token (exp of its decode logprob)
BUCKETS = ((0.0, 0.5, "p<0.5"), (0.5, 0.9, "0.5<=p<0.9"), (0.9, 0.99, "0.9<=p<0.99"), (0.99, 1.01, "p>=0.99"))
WORST = 8  # tokens listed in a failure message


@dataclass
class ParityRecord:
    """One sequence: its prompt, the ids the engine sampled with its decode logprobs, the engine's
    prefill recompute (optional), and the trainer's logprobs with the target ids it gathered and
    the input positions it scored them from (when the trainer tells them)."""

    prompt: list[int]
    sampled: list[int]
    decode: list[float]
    train: list[float]
    prefill: list[float] | None = None
    train_targets: list[int] | None = None
    train_positions: list[int] | None = None


def identity_errors(records: list[ParityRecord]) -> list[str]:
    """What is wrong before any number is compared: every one names the sequence and the token."""
    errors = []
    for i, r in enumerate(records):
        n, where = len(r.sampled), f"sequence {i}"
        if len(r.decode) != n:
            errors.append(f"{where}: the engine returned {len(r.decode)} decode logprobs for {n} sampled tokens")
        if len(r.train) != n:
            errors.append(f"{where}: mask: the trainer scored {len(r.train)} response tokens, the engine sampled {n} "
                          "(the response mask must cover exactly the generated tokens)")
        if r.prefill is not None and len(r.prefill) != n:
            errors.append(f"{where}: the prefill recompute scored {len(r.prefill)} tokens for {n} sampled")
        if r.train_targets is not None:
            bad = [j for j, (a, b) in enumerate(zip(r.train_targets, r.sampled)) if a != b]
            if bad or len(r.train_targets) != n:
                j = bad[0] if bad else min(len(r.train_targets), n)
                got = r.train_targets[j] if j < len(r.train_targets) else None
                want = r.sampled[j] if j < n else None
                errors.append(f"{where}: selected token at response position {j}: the trainer took the logprob of id "
                              f"{got}, the engine sampled id {want} ({len(bad)} such positions)")
        if r.train_positions is not None:
            want = [len(r.prompt) - 1 + j for j in range(n)]
            bad = [j for j, (a, b) in enumerate(zip(r.train_positions, want)) if a != b]
            if bad:
                j = bad[0]
                errors.append(f"{where}: token shift: response token {j} was scored from the logits at position "
                              f"{r.train_positions[j]}, expected {want[j]} (token t is predicted by position t-1; "
                              f"off by {r.train_positions[j] - want[j]} at {len(bad)} positions)")
    return errors


@dataclass
class PairFigures:
    """One comparison (e.g. trainer vs decode): aggregate and per-token figures."""

    tokens: int
    mean_abs: float
    max_abs: float
    k3_kl: float
    bitwise_equal: int
    first_token_mean_abs: float
    rest_mean_abs: float | None
    by_bucket: dict[str, dict[str, float]]
    by_position: list[float]
    deltas: list[list[float]] = field(repr=False, default_factory=list)  # per sequence, per token: b - a

    def to_json(self, per_token: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "deltas"}
        if per_token:
            d["deltas"] = self.deltas
        return d


def pair_figures(a: list[list[float]], b: list[list[float]], confidence: list[list[float]]) -> PairFigures:
    """Figures of b - a over aligned token lists; `confidence` are the rollout's logprobs (buckets)."""
    deltas = [[y - x for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    flat = [abs(d) for row in deltas for d in row]
    if not flat:
        raise AssertionError("no response tokens to compare: every sequence came back empty")
    equal = sum(
        1 for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x == y and math.copysign(1, x) == math.copysign(1, y)
    )
    k3 = [math.expm1(d) - d for row in deltas for d in row]
    first = [abs(row[0]) for row in deltas if row]
    rest = [abs(d) for row in deltas for d in row[1:]]
    buckets: dict[str, list[float]] = {}
    for row, conf in zip(deltas, confidence):
        for d, lp in zip(row, conf):
            p = math.exp(lp)
            name = next(n for lo, hi, n in BUCKETS if lo <= p < hi)
            buckets.setdefault(name, []).append(abs(d))
    width = max(len(r) for r in deltas)
    by_pos = [[abs(row[j]) for row in deltas if len(row) > j] for j in range(width)]
    return PairFigures(
        len(flat),
        sum(flat) / len(flat),
        max(flat),
        sum(k3) / len(k3),
        equal,
        sum(first) / len(first),
        sum(rest) / len(rest) if rest else None,
        {
            n: {"tokens": len(v), "mean_abs": sum(v) / len(v), "max_abs": max(v)}
            for lo, hi, n in BUCKETS
            if (v := buckets.get(n))
        },
        [sum(v) / len(v) for v in by_pos],
        deltas,
    )


@dataclass
class ParityReport:
    """Identity errors and, per pair (train_vs_decode, train_vs_prefill, prefill_vs_decode), the figures."""

    config: dict[str, Any]
    identity: list[str]
    pairs: dict[str, PairFigures]
    sequences: int
    prompt_lens: list[int]
    response_lens: list[int]
    versions: dict[str, str] = field(default_factory=dict)
    plot: str | None = None
    locator: str | None = None  # the divergence locator's answer, when one ran

    @property
    def passed(self) -> bool:
        return not self.identity

    def render(self, pair: str = "train_vs_decode") -> str:
        head = f"parity {key_text(tuple(self.config.get(n) for n in ('model', 'rollout', 'train', 'backend', 'tp')))}"
        lines = [
            f"{head}: {self.sequences} sequences, prompt length {min(self.prompt_lens)}-{max(self.prompt_lens)}, "
            f"response length {min(self.response_lens)}-{max(self.response_lens)}"
        ]
        if self.identity:
            lines.append("IDENTITY ERRORS (semantics, not numerical drift):")
            lines += [f"  {e}" for e in self.identity[:WORST]]
        for name, f in self.pairs.items():
            rest = f"{f.rest_mean_abs:.4g}" if f.rest_mean_abs is not None else "-"
            lines.append(
                f"{name}: mean |delta| {f.mean_abs:.4g}, max {f.max_abs:.4g}, K3-KL {f.k3_kl:.4g}, bitwise "
                f"equal {f.bitwise_equal}/{f.tokens}; first generated token {f.first_token_mean_abs:.4g} vs "
                f"rest {rest}"
            )
        f = self.pairs.get(pair)
        if f is not None:
            lines.append(
                "  by policy confidence: "
                + "; ".join(
                    f"{n} {b['mean_abs']:.4g} (max {b['max_abs']:.4g}, {b['tokens']} tok)"
                    for n, b in f.by_bucket.items()
                )
            )
            lines.append(
                "  by position: "
                + " ".join(f"{v:.3g}" for v in f.by_position[:24])
                + (" ..." if len(f.by_position) > 24 else "")
            )
            worst = sorted(
                ((abs(d), i, j, d) for i, row in enumerate(f.deltas) for j, d in enumerate(row)), reverse=True
            )[:WORST]
            lines.append("  worst tokens: " + "; ".join(f"seq {i} pos {j} {d:+.4g}" for _, i, j, d in worst))
        if self.plot:
            lines.append(f"plot: {self.plot}")
        if self.locator:
            lines.append(f"divergence locator: {self.locator}")
        return "\n".join(lines)

    def to_json(self, per_token: bool = True) -> dict[str, Any]:
        main = self.pairs.get("train_vs_decode")
        head = (
            {}
            if main is None
            else {
                "mean_abs": main.mean_abs,
                "max_abs": main.max_abs,
                "k3_kl": main.k3_kl,
                "first_token_mean_abs": main.first_token_mean_abs,
                "bitwise_equal": main.bitwise_equal,
                "tokens": main.tokens,
            }
        )
        return {
            **head,
            "identity_error_count": len(self.identity),
            "config": self.config,
            "identity_errors": self.identity,
            "sequences": self.sequences,
            "prompt_lens": self.prompt_lens,
            "response_lens": self.response_lens,
            "versions": self.versions,
            "pairs": {k: v.to_json(per_token) for k, v in self.pairs.items()},
            "plot": self.plot,
            "locator": self.locator,
        }


def compare_parity(
    records: list[ParityRecord], config: dict[str, Any] | None = None, versions: dict[str, str] | None = None
) -> ParityReport:
    """The report over records; the figures are computed over sequences whose lengths agree."""
    if isinstance(records, ParityRecord) or not isinstance(records, (list, tuple)) or not all(
            isinstance(r, ParityRecord) for r in records):
        raise InputError(f"compare_parity(records={records!r:.80}): expected a list of ParityRecord, one per "
                         "sequence")
    if not records:
        raise InputError("compare_parity: no records (one per sequence: prompt, sampled ids, decode, train logprobs)")
    identity = identity_errors(records)
    ok = [r for r in records if len(r.decode) == len(r.train) == len(r.sampled)]
    pairs: dict[str, PairFigures] = {}
    if ok:
        conf = [r.decode for r in ok]
        pairs["train_vs_decode"] = pair_figures([r.decode for r in ok], [r.train for r in ok], conf)
        pre = [r for r in ok if r.prefill is not None and len(r.prefill) == len(r.sampled)]
        if pre and len(pre) == len(ok):
            pairs["train_vs_prefill"] = pair_figures([r.prefill for r in ok], [r.train for r in ok], conf)
            pairs["prefill_vs_decode"] = pair_figures([r.decode for r in ok], [r.prefill for r in ok], conf)
    return ParityReport(
        dict(config or {}),
        identity,
        pairs,
        len(records),
        [len(r.prompt) for r in records],
        [len(r.sampled) for r in records],
        dict(versions or {}),
    )


def loop_parity(records: list[Any], config: dict[str, Any] | None = None) -> ParityReport:
    """The parity report of RL loop iterations (LoopRecord: the rollout's logprobs and the trainer's
    of the same ids before its step), every sample of every iteration one sequence."""
    out = []
    for r in records:
        for p, prompt in enumerate(r.prompts):
            for s, ids in enumerate(r.tokens[p]):
                if ids:
                    out.append(
                        ParityRecord(
                            list(prompt),
                            list(ids),
                            [float.fromhex(x) for x in r.logprob_bits[p][s]],
                            [float.fromhex(x) for x in r.train_logprob_bits[p][s]],
                        )
                    )
    return compare_parity(out, config)


def _over_budget(f: PairFigures, budget: Budget) -> list[str]:
    if budget.kind == "exact":
        return (
            []
            if f.bitwise_equal == f.tokens
            else [f"{f.tokens - f.bitwise_equal} of {f.tokens} tokens not bitwise equal (max |delta| {f.max_abs:.4g})"]
        )
    over = []
    for name in ("mean_abs", "max_abs", "k3_kl"):
        limit = getattr(budget, name)
        if limit is not None and getattr(f, name) > limit:
            over.append(f"{name} {getattr(f, name):.6g} > {limit:g}")
    return over


def _budget_for(
    report: ParityReport, budget: Budget | str | float | None, pair: str, budgets_file: str | None
) -> Budget | None:
    if isinstance(budget, Budget):
        return budget
    key = tuple(report.config.get(n) for n in ("model", "rollout", "train", "backend", "tp"))
    if budget == "exact" or (isinstance(budget, (int, float)) and not isinstance(budget, bool)):
        exact = budget == "exact"
        return Budget(
            *key,
            kind="exact" if exact else "tolerance",
            pair=pair,  # type: ignore[arg-type]
            mean_abs=None if exact else float(budget),
            source="given by the test",
        )
    if budget is None:
        return None if None in key else find_budget(key, pair, budgets_file)
    raise InputError(
        f"assert_parity(budget={budget!r}): expected a Budget, 'exact', a mean |delta| limit (a "
        "number) or None (look the configuration up in the parity budget files)"
    )


@recorded("train-rollout parity")
def assert_parity(
    report: ParityReport,
    budget: Budget | str | float | None = None,
    *,
    pair: str = "train_vs_decode",
    budgets_file: str | None = None,
) -> ParityReport:
    """AssertionError on identity errors (named as such) or a budget exceeded (with the per-token
    report and the locator's answer when there is one); Unbudgeted (reported "unbudgeted", a skip,
    never a pass) when no budget covers the configuration. `budget`: a Budget, "exact", a mean
    |delta| limit, or None to look the report's configuration up in the budget files."""
    if not isinstance(report, ParityReport):
        raise InputError(f"assert_parity(report=...): expected a ParityReport (from compare_parity or measure_parity), "
                         f"got {type(report).__name__}" + (" (a to_json() dict is not read back)"
                                                         if isinstance(report, dict) else ""))
    if pair not in PAIRS:
        raise InputError(f"assert_parity(pair={pair!r}): expected one of {', '.join(PAIRS)}")
    if report.identity:
        raise AssertionError(
            "train-rollout parity: identity error, not numerical drift (fix the semantics before "
            f"reading any figure):\n{report.render(pair)}"
        )
    figures = report.pairs.get(pair)
    if figures is None:
        raise AssertionError(
            f"train-rollout parity: no {pair} figures in this report (pairs measured: "
            f"{', '.join(report.pairs) or 'none'})"
        )
    chosen = _budget_for(report, budget, pair, budgets_file)
    if chosen is None:
        key = key_text(tuple(report.config.get(n) for n in ("model", "rollout", "train", "backend", "tp")))
        raise Unbudgeted(
            f"unbudgeted: no parity budget for {key} [{pair}]; "
            f"measured mean |delta| {figures.mean_abs:.6g}, max {figures.max_abs:.6g} "
            "(derive one from runs: pytest-miles parity-budget)"
        )
    over = _over_budget(figures, chosen)
    if over:
        raise AssertionError(
            f"train-rollout parity over its budget: {'; '.join(over)}\n{chosen.describe()}\n{report.render(pair)}"
        )
    return report
