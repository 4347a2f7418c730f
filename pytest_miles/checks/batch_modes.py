"""The batch-invariance modes, one small function each, registered by name (`RUNNERS`).

Each runner drives the engine through one composition of batches and hands every output to the
checker's `compare` against its reference; the modes follow SGLang's test_deterministic and vLLM's
invariance tests (docs/batch-invariance.md says what each one probes).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytest_miles.capabilities import MODES
from pytest_miles.engines.base import Output, SamplingParams

# SGLang 0.5.17 captures decode CUDA graphs at [1, 2, 4, 8, 12] + range(16, 257, 8) + ... and pads a
# batch up to the next captured size. These sizes alternate between exact buckets and padded ones
# (3->4, 5->8, 9->12, 13->16, 17->24, 25->32, 33->40), so `single` and `needle` cross the boundaries
# within the first trials; 1..trials (SGLang's own tool) stays below 12 for 10 trials.
BATCH_SIZES = (1, 3, 5, 8, 9, 13, 16, 17, 24, 33, 2, 4, 12, 25, 32, 40, 41, 48, 49, 64)
# SGLang CI's prefix lengths (characters of its long prompt), as fractions of the longest.
LONG_ANCHOR_FRACTIONS = (1 / 4097, 511 / 4097, 2048 / 4097, 1.0)


@dataclass
class Run:
    """One mode's run: the engine, the checker that compares, and the knobs of the composition."""

    engine: Any
    c: Any  # the checker: compare(ref, got, bs, item, prompt), tick(i), report
    rng: random.Random
    vocab: int
    params: SamplingParams
    trials: int
    max_batch: int
    prompt_len: int
    prompt: list[int] | None
    batch_sizes: list[int] | None

    def random_prompt(self, length: int, rng: random.Random | None = None) -> list[int]:
        return [(rng or self.rng).randrange(3, self.vocab) for _ in range(length)]

    def gen(self, prompts: list[list[int]]) -> list[Output]:
        return self.engine.generate(prompts, self.params)

    def flush(self) -> None:
        """Back to a cold cache (an engine without flush_cache has none to flush; the items'
        cached_tokens still tell a cache hit apart)."""
        flush = getattr(self.engine, "flush_cache", None)
        if flush is not None:
            flush()


def _batch_size(trial: int) -> int:
    """Trial i's batch size in `single`: the CUDA-graph-crossing sizes first, then counting on."""
    if trial <= len(BATCH_SIZES):
        return BATCH_SIZES[trial - 1]
    return BATCH_SIZES[-1] + trial - len(BATCH_SIZES)


def single(r: Run) -> None:
    """One prompt at batch sizes that cross the CUDA-graph buckets; every item compared. The cache is
    flushed before the reference and before each batch, so every item starts from the reference's
    cache state (a warm prefix cache would otherwise pass off a cold-vs-cached difference as batch
    variance; that is radix_cache's question)."""
    c, p = r.c, list(r.prompt) if r.prompt else r.random_prompt(r.prompt_len)
    r.flush()
    ref = r.gen([p])[0]
    sizes = r.batch_sizes
    graphs = c.report.settings.get("disable_cuda_graph") is False  # None (unknown): assume graphs
    if sizes is None and not graphs and "disable_cuda_graph" in c.report.settings:
        sizes = list(range(1, r.trials + 1))  # no CUDA graphs here: no buckets to cross
        c.report.notes.append("the engine runs without CUDA graphs: batch sizes 1..trials")
    for i in range(1, r.trials + 1):
        bs = sizes[(i - 1) % len(sizes)] if sizes else _batch_size(i)
        c.report.batch_sizes.append(bs)
        r.flush()
        for item, out in enumerate(r.gen([p] * bs)):
            c.compare(ref, out, bs, item, "P")
        c.tick(i)


def prefix(r: Run) -> None:
    """Prompts sharing prefixes of different lengths, in random batches, cache flushed between."""
    c, base = r.c, r.random_prompt(4 * r.prompt_len)
    lens = sorted({1, r.prompt_len // 2, r.prompt_len, 2 * r.prompt_len, 4 * r.prompt_len - 1})
    prompts = {f"prefix{n}": base[:n] + r.random_prompt(4, random.Random(n)) for n in lens}
    r.engine.flush_cache()
    refs = {k: r.gen([v])[0] for k, v in prompts.items()}
    names = list(prompts)
    for i in range(1, r.trials + 1):
        r.engine.flush_cache()
        bs = r.rng.randint(1, r.max_batch)
        picked = [r.rng.choice(names) for _ in range(bs)]
        c.report.batch_sizes.append(bs)
        for item, (name, out) in enumerate(zip(picked, r.gen([prompts[n] for n in picked]))):
            c.compare(refs[name], out, bs, item, name)
        c.tick(i)


def prefix_long_anchor(r: Run) -> None:
    """SGLang CI's prefix variant: its length proportions, the longest prompt in every batch."""
    c = r.c
    anchor_len = min(8 * r.prompt_len, 400)  # the tiny model has 512 positions
    base = r.random_prompt(anchor_len)
    lens = sorted({max(1, round(f * anchor_len)) for f in LONG_ANCHOR_FRACTIONS})
    prompts = {f"prefix{n}": base[:n] for n in lens}
    names, anchor = list(prompts), f"prefix{lens[-1]}"
    refs: dict[str, Output] = {}
    for i in range(1, r.trials + 1):
        r.engine.flush_cache()
        bs = r.rng.randint(2, max(2, r.max_batch))
        picked = [r.rng.choice(names) for _ in range(bs - 1)]
        picked.insert(r.rng.randrange(bs), anchor)  # every batch includes the long prompt, as in SGLang's CI
        c.report.batch_sizes.append(bs)
        for item, (name, out) in enumerate(zip(picked, r.gen([prompts[n] for n in picked]))):
            if name not in refs:  # the first anchored sample is the reference (SGLang counts unique outputs)
                refs[name] = out
            c.compare(refs[name], out, bs, item, name)
        c.tick(i)
    c.report.shape["anchor_len"] = anchor_len


def radix_cache(r: Run) -> None:
    """A prompt prefilled with a warm prefix cache vs after a flush."""
    c, base = r.c, r.random_prompt(2 * r.prompt_len)
    for i in range(1, r.trials + 1):
        q = base + r.random_prompt(r.rng.randint(1, r.prompt_len // 2 + 1))
        r.engine.flush_cache()
        fresh = r.gen([q])[0]
        r.engine.flush_cache()
        r.gen([base])  # warms the prefix cache with the shared prefix
        cached = r.gen([q])[0]
        c.report.cached_tokens.append(cached.cached_tokens)
        c.compare(fresh, cached, 1, 0, f"Q{i}")
        c.tick(i)
    if getattr(r.engine, "has_prefix_cache", True) is False:
        c.report.notes.append("the reference engine has no prefix cache: this compares two cold prefills")


def p_vs_d(r: Run) -> None:
    """Decode logprobs vs the logprobs of re-prefilling prompt + output (cold)."""
    c, seq_len = r.c, 0
    for i in range(1, r.trials + 1):
        p = r.random_prompt(r.rng.randint(2, r.prompt_len))
        out = r.gen([p])[0]
        r.engine.flush_cache()  # a cold re-prefill: no cached prefix from the decode above
        scored = r.engine.score(p, out.output_ids)
        seq_len = max(seq_len, len(p) + len(out.output_ids))
        c.compare(out, Output(list(out.output_ids), scored), 1, 0, f"P{i}")
        c.tick(i)
    c.report.shape["seq_len"] = seq_len


def needle(r: Run) -> None:
    """The prompt at a random position inside batches of other prompts, each batch on a flushed cache
    as the reference was; the prompt alone once more first (batch size 1: the reference reproduces)."""
    c, needle_prompt = r.c, list(r.prompt) if r.prompt else r.random_prompt(r.prompt_len)
    r.flush()
    ref = r.gen([needle_prompt])[0]
    r.flush()
    c.compare(ref, r.gen([needle_prompt])[0], 1, 0, "needle")  # one more sample, not a trial
    for i in range(1, r.trials + 1):
        sizes = [b for b in BATCH_SIZES if 2 <= b <= max(2, r.max_batch)]
        bs = sizes[(i - 1) % len(sizes)]
        others = [r.random_prompt(r.rng.randint(2, 2 * r.prompt_len)) for _ in range(bs - 1)]
        at = r.rng.randrange(bs)
        batch = others[:at] + [needle_prompt] + others[at:]
        c.report.batch_sizes.append(bs)
        r.flush()
        c.compare(ref, r.gen(batch)[at], bs, at, "needle")
        c.tick(i)


RUNNERS: dict[str, Callable[[Run], None]] = {
    "single": single, "prefix": prefix, "prefix_long_anchor": prefix_long_anchor,
    "radix_cache": radix_cache, "p_vs_d": p_vs_d, "needle": needle}
if tuple(RUNNERS) != MODES:  # pragma: no cover  (the capability schema and the runners name the same modes)
    raise RuntimeError(f"batch-invariance runners {tuple(RUNNERS)} differ from the capability modes {MODES}")


def run_mode(mode: str, run: Run) -> None:
    RUNNERS[mode](run)
