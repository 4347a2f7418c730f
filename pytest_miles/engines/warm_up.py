"""An engine's warm-up: the first requests a started server answers before anything is measured, then
a cache flush, so that kernels a JIT builds at their first use are built during the start (which a
background start overlaps), not inside a check: on 2026-12-04 (H200, beside two other test sessions)
the first sampled request of a determinism-off SGLang server waited about 3 minutes for FlashInfer's
sampling kernels (flashinfer 0.6.15.post1 `sampling.py:67-68`: built by a JIT at their first use)."""

from __future__ import annotations

import time
import warnings
from typing import Any

from pytest_miles.engines.base import SamplingParams
from pytest_miles.errors import EngineError
from pytest_miles.recording import stage

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]  # token ids every model's vocabulary has


def sglang_warmup_params(deterministic: bool) -> list[SamplingParams]:
    """A greedy and a sampled request (top-k, top-p; min-p too where determinism is off: a deterministic
    SGLang 0.5.17 server dies on min-p, the capability data's min-p-with-seed-kills-the-server). With
    determinism off SGLang samples with FlashInfer's kernels; deterministic mode with the pytorch backend."""
    sampled = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.0 if deterministic else 0.05,
                             max_new_tokens=2, sampling_seed=1)
    return [SamplingParams(temperature=0.0, max_new_tokens=2), sampled]


def warm_up(engine: Any) -> None:
    """Serve `engine.warmup_params()` once each and flush the cache. The time goes to
    `engine.warmup_seconds`; a failed request is a warning (`engine.warmup_error`): the checks meet the
    engine as it is."""
    params = engine.warmup_params()
    if not params:
        return
    t0 = time.monotonic()
    try:
        with stage(f"warming up {engine.name} (first requests: kernels built at first use)", hint=engine.start_advice):
            for p in params:
                engine.generate_one(PROMPT, p)
            engine.flush_cache()
    except EngineError as exc:
        engine.warmup_error = str(exc)
        warnings.warn(f"pytest-miles: {engine.name}'s warm-up request failed (the checks meet it as it is): "
                      f"{str(exc)[:500]}", stacklevel=3)
    engine.warmup_seconds = time.monotonic() - t0
