"""Batch invariance: the same prompt gives the same token ids AND logprobs, bit for bit, whatever
else shares its batch. The modes (one function each) live in `batch_modes`; this module runs one,
judges its report against the capability data and records it (docs/batch-invariance.md)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.capabilities import MODES  # the mode names, defined once
from pytest_miles.checks.batch_modes import BATCH_SIZES, LONG_ANCHOR_FRACTIONS, Run, run_mode  # noqa: F401
from pytest_miles.checks.witness import context_lines, engine_settings, radix_cache_witness
from pytest_miles.engines.base import Output, SamplingParams
from pytest_miles.recording import recorded


@dataclass
class Mismatch:
    mode: str
    batch_size: int
    item: int
    prompt: str
    position: int
    expected_id: int | None
    got_id: int | None
    expected_logprob: float | None
    got_logprob: float | None
    variance: str = ""  # batch composition | cache state | arrival order (see classify)
    expected_cached: int | None = None  # prefix-cache hits (cached_tokens) of the reference and of the item
    got_cached: int | None = None

    def render(self) -> str:
        cached = (f", cached tokens {self.expected_cached} vs {self.got_cached}"
                  if self.variance == "cache state" else "")
        return (f"mode={self.mode} batch_size={self.batch_size} item={self.item} prompt={self.prompt}: first "
                f"difference at token {self.position}: id {self.expected_id} vs {self.got_id}, logprob "
                f"{self.expected_logprob!r} vs {self.got_logprob!r}" + (f" [{self.variance}{cached}]"
                                                                          if self.variance else ""))


def classify(ref: Output, got: Output, batch_size: int) -> str:
    """Which variance a deviation from the reference shows: 'cache state' when the two were served
    from different prefix-cache states (cached_tokens differ), 'arrival order' when the item ran
    alone (batch size 1) in the same cache state, so its batch cannot be the cause, else 'batch
    composition' (same cache state, another batch)."""
    if (ref.cached_tokens or 0) != (got.cached_tokens or 0):
        return "cache state"
    return "arrival order" if batch_size == 1 else "batch composition"


@dataclass
class InvarianceReport:
    mode: str
    engine: str
    trials: int
    samples: int = 0
    unique: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    seconds: float = 0.0
    max_logprob_deviation: dict[int, float] = field(default_factory=dict)  # batch size -> max |dlogp|
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # the engine's effective settings (witness)
    shape: dict[str, Any] = field(default_factory=dict)  # seed, max_batch, prompt_len, seq_len
    cached_tokens: list[int | None] = field(default_factory=list)  # radix_cache: per warm request
    alone_matched: int = 0  # items alone (batch size 1), same cache state as the reference, bitwise equal

    @property
    def variances(self) -> dict[str, int]:
        """Deviating items per variance (batch composition, cache state, arrival order)."""
        out: dict[str, int] = {}
        for m in self.mismatches:
            out[m.variance or "unclassified"] = out.get(m.variance or "unclassified", 0) + 1
        return out

    def batch_variance(self) -> tuple[bool, str]:
        """(caught, why) for a negative control about batch composition: caught only when items
        deviated in another batch under the reference's cache state while the prompt alone, in that
        same state, gave the reference's bits; a deviation from the cache state or already at batch
        size 1 is another variance, named, and leaves the control vacuous."""
        v = self.variances
        comp, cache, alone = v.get("batch composition", 0), v.get("cache state", 0), v.get("arrival order", 0)
        sizes = sorted({m.batch_size for m in self.mismatches if m.variance == "batch composition"})
        if comp and not alone and self.alone_matched:
            extra = f"; also {cache} cache-state deviation(s), not counted" if cache else ""
            return True, (f"batch composition: {comp} item(s) deviated at batch size(s) {', '.join(map(str, sizes))} "
                          f"in the reference's cache state, while alone in that state the prompt matched the "
                          f"reference bit for bit ({self.alone_matched} time(s)){extra}")
        why = []
        if not self.mismatches:
            why.append("nothing deviated")
        if cache:
            why.append(f"{cache} deviation(s) are cache state (the reference and the item were served from "
                       "different prefix-cache states), not batch composition")
        if alone:
            why.append(f"{alone} deviation(s) already at batch size 1 in the reference's cache state (arrival "
                       "order: the engine's history, not the batch), so deviations in larger batches cannot be "
                       "put on the batch")
        if comp and not alone and not self.alone_matched:
            why.append("no run of the prompt alone in the reference's cache state to show the reference is "
                       "reproducible, so the deviations cannot be put on the batch")
        return False, "; ".join(why)

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def render(self, limit: int = 10) -> str:
        uniq = ", ".join(f"{k}: {v}" for k, v in self.unique.items())
        head = (f"batch invariance [{self.mode}] on {self.engine}: {'PASS' if self.passed else 'FAIL'}; "
                f"{self.samples} samples, unique samples per prompt ({uniq}); trials {self.trials}, "
                f"{self.seconds:.1f} s")
        lines = [head]
        for m in self.mismatches[:limit]:
            lines.append("  - " + m.render())
        if len(self.mismatches) > limit:
            lines.append(f"  ... and {len(self.mismatches) - limit} more mismatching items")
        if self.mismatches:
            lines.append("  variance: " + ", ".join(f"{k} ({n})" for k, n in self.variances.items()))
        if self.max_logprob_deviation and not self.passed:
            dev = ", ".join(f"bs {k}: {v:.3g}" for k, v in sorted(self.max_logprob_deviation.items()) if v)
            lines.append(f"  max |logprob - reference| by batch size: {dev}")
        lines += context_lines(self.shape, self.settings, self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "engine": self.engine, "passed": self.passed, "trials": self.trials,
                "samples": self.samples, "unique": self.unique, "seconds": self.seconds,
                "mismatches": [vars(m) for m in self.mismatches],
                "max_logprob_deviation": self.max_logprob_deviation, "notes": self.notes,
                "settings": self.settings, "shape": self.shape, "cached_tokens": self.cached_tokens,
                "variances": self.variances, "alone_matched": self.alone_matched}


def _engine_vocab(engine) -> int:
    cfg = getattr(engine, "config", None)
    return getattr(cfg, "vocab_size", 512)


class _Checker:
    def __init__(self, engine, mode: str, trials: int, params: SamplingParams,
                 progress: Callable[[int, int], None] | None):
        self.engine, self.mode, self.params = engine, mode, params
        self.report = InvarianceReport(mode, getattr(engine, "name", type(engine).__name__), trials)
        self.seen: dict[str, set] = {}
        self.progress = progress
        self.total = trials

    def compare(self, ref: Output, got: Output, bs: int, item: int, prompt: str) -> None:
        r = self.report
        r.samples += 1
        self.seen.setdefault(prompt, set()).add((tuple(got.output_ids), tuple(got.logprobs)))
        dev = max((abs(a - b) for a, b in zip(ref.logprobs, got.logprobs)), default=0.0)
        r.max_logprob_deviation[bs] = max(r.max_logprob_deviation.get(bs, 0.0), dev)
        n = max(len(ref.output_ids), len(got.output_ids))
        for pos in range(n):
            e_id = ref.output_ids[pos] if pos < len(ref.output_ids) else None
            g_id = got.output_ids[pos] if pos < len(got.output_ids) else None
            e_lp = ref.logprobs[pos] if pos < len(ref.logprobs) else None
            g_lp = got.logprobs[pos] if pos < len(got.logprobs) else None
            same_lp = (e_lp is None and g_lp is None) or (e_lp is not None and g_lp is not None
                                                           and e_lp.hex() == g_lp.hex())
            if e_id != g_id or not same_lp:
                variance = "" if self.mode == "p_vs_d" else classify(ref, got, bs)  # p_vs_d: decode vs prefill
                r.mismatches.append(Mismatch(self.mode, bs, item, prompt, pos, e_id, g_id, e_lp, g_lp,
                                             variance, ref.cached_tokens, got.cached_tokens))
                return
        if bs == 1 and self.mode != "p_vs_d" and classify(ref, got, bs) == "arrival order":  # alone, same state
            r.alone_matched += 1

    def tick(self, done: int) -> None:
        if self.progress is not None:
            self.progress(done, self.total)

    def finish(self, t0: float) -> InvarianceReport:
        self.report.unique = {k: len(v) for k, v in self.seen.items()}
        self.report.seconds = time.perf_counter() - t0
        return self.report


def check_batch_invariance(engine, mode: str = "single", trials: int = 10, *, params: SamplingParams | None = None,
                           max_batch: int = 16, prompt_len: int = 48, seed: int = 0,
                           progress: Callable[[int, int], None] | None = None,
                           prompt: list[int] | None = None, batch_sizes: list[int] | None = None) -> InvarianceReport:
    """Run one mode and return its report (no assertion). `prompt` fixes the prompt of the
    single and needle modes (default: random token ids of `prompt_len`); `batch_sizes` replaces
    single's CUDA-graph-crossing sizes (e.g. 1..trials, as SGLang's tool)."""
    from pytest_miles.validation import MAX_COUNT, check_engine, integer, token_ids

    check_engine("engine", engine)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    integer("trials", trials, minimum=1, maximum=MAX_COUNT)
    integer("max_batch", max_batch, minimum=1, maximum=MAX_COUNT)
    integer("prompt_len", prompt_len, minimum=2, maximum=MAX_COUNT)
    integer("seed", seed)
    if prompt is not None:
        prompt = token_ids("prompt", prompt)
    if batch_sizes is not None:
        if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, (list, tuple)) or not batch_sizes:
            raise ValueError(f"batch_sizes: {batch_sizes!r:.80} is not accepted; expected a non-empty list of "
                             "batch sizes, e.g. [1, 2, 4, 8]")
        batch_sizes = [integer(f"batch_sizes[{i}]", b, minimum=1, maximum=MAX_COUNT) for i, b in enumerate(batch_sizes)]
    if progress is not None and not callable(progress):
        raise ValueError(f"progress: expected a callable(done, total) or None, got {type(progress).__name__}")
    if params is not None and not isinstance(params, SamplingParams):
        raise ValueError(f"params: expected a SamplingParams, got {type(params).__name__}")
    params = params or SamplingParams(temperature=0.0 if mode == "p_vs_d" else 1.0, max_new_tokens=8, sampling_seed=42)
    rng = random.Random(seed)
    vocab = _engine_vocab(engine)
    c = _Checker(engine, mode, trials, params, progress)
    c.report.settings = engine_settings(engine)
    c.report.shape = {"seed": seed, "max_batch": max_batch, "prompt_len": prompt_len,
                      "max_new_tokens": params.max_new_tokens}
    t0 = time.perf_counter()
    run_mode(mode, Run(engine, c, rng, vocab, params, trials, max_batch, prompt_len, prompt, batch_sizes))
    return c.finish(t0)


def judge_report(engine, report: InvarianceReport, capabilities=None) -> InvarianceReport:
    """The outcome of a finished report on this engine: witnesses first (radix_cache must show a
    cache hit), then the capability rule (promised: hard check; known limitation: KnownLimitation /
    XPASS; not applicable: NotApplicable). See pytest_miles.capabilities.verdict."""
    from pytest_miles.capabilities import Capability
    from pytest_miles.capabilities.verdict import NotApplicable, capability_for, judge

    cap = capability_for(engine, report.mode, report.shape, report.settings, capabilities)
    if report.mode == "radix_cache":
        status, detail = radix_cache_witness(report.settings, report.cached_tokens, report.engine)
        if status == "not_applicable":
            data = f"; capability data: {cap.describe()}" if cap.status == "not_applicable" else ""
            raise NotApplicable(f"radix_cache not applicable: {detail}{data}")
        if status == "vacuous":
            raise AssertionError(f"radix_cache shows nothing here: {detail}\n{report.render()}")
        report.notes.append(f"witness: {detail}")
        if cap.status == "not_applicable":  # the engine shows a cache hit: the data's 'no cache' is wrong here
            report.notes.append(f"the capability data says not applicable ({cap.describe()}), but the cache was hit: "
                                "checked as promised")
            cap = Capability("promised", None, True, cap.where)
    if cap.cell is not None:
        report.notes.append(f"capability: {cap.status} [{cap.cell.id}]")
    return judge(report, cap)


@recorded("batch invariance", settings={"trials": "trials"}, progress=True)
def assert_batch_invariant(engine, mode: str = "single", trials: int = 10, *, capabilities=None,
                           **kwargs: Any) -> InvarianceReport:
    """Raise AssertionError with the full report unless every item matches its reference bitwise,
    where the capability data promises it. A known upstream limitation raises KnownLimitation (an
    XFAIL under pytest), a check that cannot test anything here raises NotApplicable (a skip), and a
    known limitation that passes under the shape that reproduces it raises UnexpectedPass."""
    report = check_batch_invariance(engine, mode, trials, **kwargs)
    return judge_report(engine, report, capabilities)


@recorded("negative control (must fail)", settings={"trials": "trials"}, progress=True)
def negative_control(engine, mode: str = "single", trials: int = 10, **kwargs: Any) -> InvarianceReport:
    """The same check on an engine with determinism off: it must FAIL for the variance it is about
    (batch composition, in the reference's cache state), or a pass means nothing.

    Raises AssertionError when the check cannot fail on this engine, or when what it caught is
    another variance (cache state, arrival order): the control is then vacuous, with the reason."""
    report = check_batch_invariance(engine, mode, trials, **kwargs)
    if report.passed:
        raise AssertionError(f"negative control: [{mode}] passed on {_described(engine, report.engine)}, so "
                             f"a pass of this check does not show determinism here\n{report.render()}")
    caught, why = report.batch_variance()
    if not caught:
        raise AssertionError(f"negative control: [{mode}] vacuous on {report.engine}: it deviated, but not by batch "
                             f"composition: {why}\n{report.render()}")
    report.notes.append(f"the check can fail here: it caught the non-invariant engine; variance caught: {why}")
    return report


def _described(engine, name: str) -> str:
    """What the engine was: a negative control passed on an engine whose determinism was on says
    so (the wrong engine was given), rather than claiming determinism was off."""
    on = getattr(engine, "deterministic", None)
    if on:
        return (f"{name}, an engine with its deterministic / batch-invariant mode ON (a negative control "
                "needs one with it off, e.g. engine_factory(kind, deterministic=False))")
    if on is None:
        return f"{name} (it does not say whether its deterministic mode is on)"
    return f"{name} with determinism off (the check cannot fail on this stack: tiny models hide batch variance)"
