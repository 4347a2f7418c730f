"""Batch invariance: the same prompt gives the same token ids AND logprobs, bit for bit,
whatever else shares its batch. Modes follow SGLang's test_deterministic and vLLM's tests:

- single: one prompt at batch sizes 1..trials; every item compared (not only the first's text)
- prefix: prompts sharing prefixes of different lengths, in random batches, cache flushed
- radix_cache: a prompt prefilled with a warm prefix cache vs after a flush
- p_vs_d: decode logprobs vs the logprobs of re-prefilling prompt + output
- needle: the prompt at a random position inside random batches of other prompts
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engines.base import Output, SamplingParams
from ..recording import recorded

MODES = ("single", "prefix", "radix_cache", "p_vs_d", "needle")


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

    def render(self) -> str:
        return (f"mode={self.mode} batch_size={self.batch_size} item={self.item} prompt={self.prompt}: first "
                f"difference at token {self.position}: id {self.expected_id} vs {self.got_id}, logprob "
                f"{self.expected_logprob!r} vs {self.got_logprob!r}")


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
        if self.max_logprob_deviation and not self.passed:
            dev = ", ".join(f"bs {k}: {v:.3g}" for k, v in sorted(self.max_logprob_deviation.items()) if v)
            lines.append(f"  max |logprob - reference| by batch size: {dev}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "engine": self.engine, "passed": self.passed, "trials": self.trials,
                "samples": self.samples, "unique": self.unique, "seconds": self.seconds,
                "mismatches": [vars(m) for m in self.mismatches],
                "max_logprob_deviation": self.max_logprob_deviation, "notes": self.notes}


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def _engine_vocab(engine) -> int:
    cfg = getattr(engine, "config", None)
    return getattr(cfg, "vocab_size", 512)


class _Checker:
    def __init__(self, engine, mode: str, trials: int, params: SamplingParams, progress: Callable[[int, int], None] | None):
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
                r.mismatches.append(Mismatch(self.mode, bs, item, prompt, pos, e_id, g_id, e_lp, g_lp))
                return

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
                           prompt: list[int] | None = None) -> InvarianceReport:
    """Run one mode and return its report (no assertion). `prompt` fixes the prompt of the
    single and needle modes (default: random token ids of `prompt_len`)."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: expected an integer >= 1, got {trials!r}")
    if max_batch < 1 or prompt_len < 2:
        raise ValueError("max_batch must be >= 1 and prompt_len >= 2")
    params = params or SamplingParams(temperature=0.0 if mode == "p_vs_d" else 1.0, max_new_tokens=8, sampling_seed=42)
    rng = random.Random(seed)
    vocab = _engine_vocab(engine)
    c = _Checker(engine, mode, trials, params, progress)
    t0 = time.perf_counter()
    gen = engine.generate

    if mode == "single":
        p = list(prompt) if prompt else _prompt(rng, prompt_len, vocab)
        ref = gen([p], params)[0]
        for i in range(1, trials + 1):
            bs = i
            c.report.batch_sizes.append(bs)
            for item, out in enumerate(gen([p] * bs, params)):
                c.compare(ref, out, bs, item, "P")
            c.tick(i)
    elif mode == "prefix":
        base = _prompt(rng, 4 * prompt_len, vocab)
        lens = sorted({1, prompt_len // 2, prompt_len, 2 * prompt_len, 4 * prompt_len - 1})
        prompts = {f"prefix{n}": base[:n] + _prompt(random.Random(n), 4, vocab) for n in lens}
        engine.flush_cache()
        refs = {k: gen([v], params)[0] for k, v in prompts.items()}
        names = list(prompts)
        for i in range(1, trials + 1):
            engine.flush_cache()
            bs = rng.randint(1, max_batch)
            picked = [rng.choice(names) for _ in range(bs)]
            c.report.batch_sizes.append(bs)
            for item, (name, out) in enumerate(zip(picked, gen([prompts[n] for n in picked], params))):
                c.compare(refs[name], out, bs, item, name)
            c.tick(i)
    elif mode == "radix_cache":
        base = _prompt(rng, 2 * prompt_len, vocab)
        for i in range(1, trials + 1):
            q = base + _prompt(rng, rng.randint(1, prompt_len // 2 + 1), vocab)
            engine.flush_cache()
            fresh = gen([q], params)[0]
            engine.flush_cache()
            gen([base], params)  # warms the prefix cache with the shared prefix
            cached = gen([q], params)[0]
            c.compare(fresh, cached, 1, 0, f"Q{i}")
            c.tick(i)
        if getattr(engine, "has_prefix_cache", True) is False:
            c.report.notes.append("the reference engine has no prefix cache: this compares two cold prefills")
    elif mode == "p_vs_d":
        for i in range(1, trials + 1):
            p = _prompt(rng, rng.randint(2, prompt_len), vocab)
            out = gen([p], params)[0]
            engine.flush_cache()  # a cold re-prefill: no cached prefix from the decode above
            scored = engine.score(p, out.output_ids)
            c.compare(out, Output(list(out.output_ids), scored), 1, 0, f"P{i}")
            c.tick(i)
    elif mode == "needle":
        needle = list(prompt) if prompt else _prompt(rng, prompt_len, vocab)
        ref = gen([needle], params)[0]
        for i in range(1, trials + 1):
            bs = rng.randint(2, max(2, max_batch))
            others = [_prompt(rng, rng.randint(2, 2 * prompt_len), vocab) for _ in range(bs - 1)]
            at = rng.randrange(bs)
            batch = others[:at] + [needle] + others[at:]
            c.report.batch_sizes.append(bs)
            c.compare(ref, gen(batch, params)[at], bs, at, "needle")
            c.tick(i)
    return c.finish(t0)


@recorded("batch invariance", settings={"trials": "trials"}, progress=True)
def assert_batch_invariant(engine, mode: str = "single", trials: int = 10, **kwargs: Any) -> InvarianceReport:
    """Raise AssertionError with the full report unless every item matches its reference bitwise."""
    report = check_batch_invariance(engine, mode, trials, **kwargs)
    if not report.passed:
        raise AssertionError(report.render())
    return report


@recorded("negative control (must fail)", settings={"trials": "trials"}, progress=True)
def negative_control(engine, mode: str = "single", trials: int = 10, **kwargs: Any) -> InvarianceReport:
    """The same check on an engine with determinism off: it must FAIL, or a pass means nothing.

    Raises AssertionError when the check cannot fail on this engine."""
    report = check_batch_invariance(engine, mode, trials, **kwargs)
    if report.passed:
        raise AssertionError(f"negative control: [{mode}] passed on {_described(engine, report.engine)}, so "
                             f"a pass of this check does not show determinism here\n{report.render()}")
    report.notes.append("the check can fail here: it caught the non-invariant engine")
    return report


def _described(engine, name: str) -> str:
    """What the engine was: a negative control passed on an engine whose determinism was on says
    so (the wrong engine was given), rather than claiming determinism was off."""
    on = getattr(engine, "deterministic", getattr(engine, "batch_invariant", None))
    if on:
        return (f"{name}, an engine with its deterministic / batch-invariant mode ON (a negative control "
                "needs one with it off, e.g. engine_factory(kind, deterministic=False))")
    if on is None:
        return f"{name} (it does not say whether its deterministic mode is on)"
    return f"{name} with determinism off (the check cannot fail on this stack: tiny models hide batch variance)"
