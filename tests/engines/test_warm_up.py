"""An engine's warm-up: the first requests a started server answers before anything is measured, so that
kernels a JIT builds at their first use are built during the start (on 2026-12-04, H200, the first sampled
request of a determinism-off SGLang server waited ~3 minutes for FlashInfer's sampling kernels inside a
check). Shown on the embedded reference server (a real subprocess), and SGLang's warm-up requests."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from pytest_miles.engines.base import SamplingParams  # noqa: E402
from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.engines.server import SGLangEngine  # noqa: E402
from pytest_miles.models.embedded import write_hf_checkpoint  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=2)


class WarmedReference(ReferenceServerEngine):
    params = [GREEDY, SamplingParams(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=2, sampling_seed=1)]

    def warmup_params(self):
        return self.params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_a_started_server_has_answered_its_warm_up_and_its_cache_is_flushed(model_dir, tmp_path):
    with WarmedReference(model_dir, deterministic=True, prefix_cache=True, log_dir=tmp_path) as s:
        assert s.warmup_seconds is not None and s.warmup_seconds > 0 and s.warmup_error is None
        served = s.metrics()
        assert any(k.endswith("prompt_tokens_total") and v >= 16 for k, v in served.items()), served  # 2 x 8 tokens
        first = s.generate_one([1, 2, 3, 4, 5, 6, 7, 8], GREEDY)
        assert first.cached_tokens == 0  # the warm-up's prompt is not in the prefix cache: flushed


def test_a_failed_warm_up_is_a_warning_and_the_engine_is_kept(model_dir, tmp_path):
    class TooLong(WarmedReference):  # NEGATIVE CONTROL: a request the server refuses (past its positions)
        params = [SamplingParams(temperature=0.0, max_new_tokens=100_000)]

    with pytest.warns(UserWarning, match="warm-up request failed"):
        s = TooLong(model_dir, log_dir=tmp_path).start()
    try:
        assert s.warmup_error and s.alive and s.generate_one([1, 2, 3], GREEDY).output_ids
    finally:
        s.close()


def test_sglang_warms_up_greedy_and_sampled_with_min_p_only_where_determinism_is_off(model_dir):
    on = SGLangEngine(model_dir, deterministic=True).warmup_params()
    off = SGLangEngine(model_dir, deterministic=False).warmup_params()
    assert [p.temperature for p in on] == [0.0, 1.0] and on[1].top_k == 40 and on[1].top_p == 0.9
    assert on[1].min_p == 0.0 and off[1].min_p == 0.05  # min-p kills a deterministic 0.5.17 server


def test_the_dump_engine_has_no_warm_up(model_dir):
    """Every forward pass of the dump engine writes a file the locator reads; SGLang skips its own warm-up there."""
    from pytest_miles.engines.sglang_dump import SGLangDumpEngine

    eng = SGLangDumpEngine(model_dir)
    try:
        assert eng.warmup_params() == []
    finally:
        eng.close()
