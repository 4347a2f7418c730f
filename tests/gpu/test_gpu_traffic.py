"""Real SGLang under production-like traffic on the GPU host: >= 256 concurrent requests, a small
KV pool (--max-total-tokens) so requests are retracted, --chunked-prefill-size 128, mixed sampling,
streaming and whole; witnesses from /metrics (--enable-metrics) and the server log. With
determinism on every request must equal itself alone and in another arrival order; with it off the
negative control must be caught with its variance named. Run with --miles-model-shape qwen2.5-0.5b."""

from __future__ import annotations

import pytest

from pytest_miles.errors import KnownLimitation, NotApplicable
from pytest_miles.scenarios.traffic import assert_deterministic_under_load, traffic_negative_control

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]
BACKENDS = ["flashinfer", "triton"]
REQUESTS = 256
# 2026-12-04 on the H200 (0.5B shape, 512 positions: prompts up to 432 tokens) CHUNK 512 / POOL 8192 gave
# no chunked prefill and no retraction (140 requests ran at once): both made smaller.
CHUNK = 128
POOL = 4096  # tokens: far less than 256 requests x ~250 tokens, so the scheduler must retract


def _engine(engine_factory, backend: str, deterministic: bool):
    args = ("--max-total-tokens", str(POOL), "--chunked-prefill-size", str(CHUNK), "--enable-metrics")
    return engine_factory("sglang", attention_backend=backend, deterministic=deterministic, extra_args=args)


def _shape(eng) -> dict:
    ctx = int(eng.server_info().get("context_length") or 512)
    return {"max_prompt": max(16, min(1200, ctx - 80)), "max_new_tokens": 48, "spread_s": 2.0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sglang_deterministic_under_load(engine_factory, backend):
    eng = _engine(engine_factory, backend, True)
    try:
        report = assert_deterministic_under_load(eng, REQUESTS, stall_timeout=300.0, **_shape(eng))
    except (KnownLimitation, NotApplicable) as exc:
        print(f"{type(exc).__name__}: {exc}")
        raise
    print(report.render())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sglang_traffic_negative_control(engine_factory, backend):
    eng = _engine(engine_factory, backend, False)
    report = traffic_negative_control(eng, REQUESTS, stall_timeout=300.0, **_shape(eng))
    print(report.render(limit=6))
