"""The batch-invariance negative controls on real SGLang, determinism OFF (radix cache on, as the
flag-off server runs): each must be caught for batch composition in the reference's cache state,
with the variance named. The same server behind a flush that does nothing (the reference a cold
prefill, every later request a prefix-cache hit: the case measured on an H200, deviation 0.0081 at
every batch size including 1) must be reported as cache state, not caught. Run with
--miles-model-shape qwen2.5-0.5b for a realistic shape (the tiny model may hide batch variance)."""

from __future__ import annotations

import pytest

from pytest_miles.checks.batch_invariance import check_batch_invariance
from pytest_miles.engines.base import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]
BACKENDS = ["flashinfer", "triton"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
SHAPE = {"max_batch": 8, "prompt_len": 24}


class StaleCache:
    """Negative control (a named fake): the real server behind a flush_cache that does nothing."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def flush_cache(self) -> None:
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_sglang_controls_name_their_variance(engine_factory, backend):
    eng = engine_factory("sglang", attention_backend=backend, deterministic=False)
    for mode in ("single", "needle"):
        report = check_batch_invariance(eng, mode, 20, params=GREEDY, **SHAPE)
        caught, why = report.batch_variance()
        print(f"[{mode}] {backend}: caught={caught}: {why}\n{report.render(limit=4)}")
        assert caught, f"[{mode}] not caught for batch composition: {why}"
        assert "batch composition" in why
    stale = check_batch_invariance(StaleCache(eng), "single", 20, params=GREEDY, seed=1, **SHAPE)
    caught, why = stale.batch_variance()
    print(f"[single, cache never flushed] {backend}: caught={caught}: {why}\n{stale.render(limit=4)}")
    if stale.mismatches:
        assert not caught and "cache state" in why
