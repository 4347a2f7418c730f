"""Systematic batch compositions, instead of random batch sizes only (after SGLang's
`logprob_test_utils.coverage_cases`): every singleton, every ordered pair, cyclic windows and
adjacent duplicates over a set of prompts, with prompt lengths on the kernel tile and page
boundaries where a batch's shape switches kernels (FlashInfer's Q tiles at 16/64/128 tokens)."""

from __future__ import annotations

from pytest_miles.errors import InputError
from pytest_miles.recording import recorded

TILE_BOUNDARIES = (1, 15, 16, 17, 63, 64, 65, 127, 128, 129)


def boundary_lengths(page_size: int = 16, max_len: int | None = None) -> list[int]:
    """Prompt lengths on the tile boundaries and at page_size - 1, page_size, page_size + 1
    (those <= max_len), sorted."""
    if not isinstance(page_size, int) or page_size < 1:
        raise InputError(f"page_size: expected an integer >= 1, got {page_size!r}")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise InputError(f"max_len: expected an integer >= 1 or None, got {max_len!r}")
    lens = set(TILE_BOUNDARIES) | {n for n in (page_size - 1, page_size, page_size + 1) if n >= 1}
    return sorted(n for n in lens if max_len is None or n <= max_len)


MAX_PROMPTS = 4096  # the ordered pairs grow as n^2: 16.8 million batches at this bound


def coverage_cases(n: int, window: int = 3) -> dict[str, list[tuple[int, ...]]]:
    """Batches of prompt indices 0..n-1, by kind: singletons (i,), ordered pairs (i, j) with
    i != j (both orders), cyclic windows (i, i+1, ..., i+window-1 mod n), adjacent duplicates
    (i, i)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROMPTS:
        raise InputError(f"n: expected the number of prompts, an integer in [1, {MAX_PROMPTS}] (n^2 ordered pairs), "
                         f"got {n!r:.60}")
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= MAX_PROMPTS:
        raise InputError(f"window: expected an integer in [2, {MAX_PROMPTS}], got {window!r:.60}")
    return {"singletons": [(i,) for i in range(n)],
            "ordered_pairs": [(i, j) for i in range(n) for j in range(n) if i != j],
            "cyclic_windows": [tuple((i + k) % n for k in range(window)) for i in range(n)] if n >= window else [],
            "adjacent_duplicates": [(i, i) for i in range(n)]}


def composition_batches(n: int, window: int = 3) -> list[tuple[str, tuple[int, ...]]]:
    """coverage_cases flattened: (kind, batch) in a fixed order."""
    return [(kind, batch) for kind, batches in coverage_cases(n, window).items() for batch in batches]


def check_compositions(engine, *, page_size: int = 16, max_len: int = 129, params=None, seed: int = 0,
                       window: int = 3) -> tuple[int, list[str]]:
    """Every composition batch over prompts of the boundary lengths, each item compared bitwise
    (ids, chosen logprobs) with the same prompt alone after a cache flush. Returns (items
    compared, differences)."""
    import random

    from pytest_miles.checks.traffic import first_difference
    from pytest_miles.engines.base import SamplingParams

    params = params or SamplingParams(temperature=0.0, max_new_tokens=4)
    vocab = getattr(getattr(engine, "config", None), "vocab_size", 512)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in boundary_lengths(page_size, max_len)]
    alone = []
    for p in prompts:
        engine.flush_cache()
        alone.append(engine.generate([p], params)[0])
    compared, diffs = 0, []
    for kind, batch in composition_batches(len(prompts), window):
        engine.flush_cache()
        for slot, (i, out) in enumerate(zip(batch, engine.generate([prompts[i] for i in batch], params))):
            compared += 1
            d = first_difference(alone[i], out)
            if d is not None:
                diffs.append(f"{kind} {batch}, slot {slot} (prompt length {len(prompts[i])}): {d}")
    return compared, diffs


@recorded("batch compositions")
def assert_composition_invariant(engine, **kwargs) -> dict:
    """AssertionError listing the differences (batch composition variance); else the figures."""
    compared, diffs = check_compositions(engine, **kwargs)
    name = getattr(engine, "name", type(engine).__name__)
    if diffs:
        raise AssertionError(f"batch compositions on {name}: {len(diffs)} of {compared} items differ from the "
                             "prompt alone (batch composition variance):\n" + "\n".join("  - " + d for d in diffs[:10]))
    return {"engine": name, "items": compared}
