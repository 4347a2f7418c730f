"""Real SGLang on the GPU host: every batch-invariance mode with --enable-deterministic-inference,
on triton and flashinfer, and the negative control with the flag off."""

from __future__ import annotations

import pytest

from pytest_miles.capabilities.verdict import KnownLimitation, NotApplicable
from pytest_miles.checks.batch_invariance import MODES, assert_batch_invariant, negative_control
from pytest_miles.engines.base import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
BACKENDS = ["triton", "flashinfer"]
TRIALS = {"single": 16, "prefix": 8, "prefix_long_anchor": 8, "radix_cache": 4, "p_vs_d": 4, "needle": 8}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_mode_with_deterministic_inference(engine_factory, backend):
    eng = engine_factory("sglang", attention_backend=backend)
    print(f"\nsglang [{backend}] deterministic engine healthy after {eng.startup_seconds:.1f} s")
    failed = []
    for mode in MODES:
        try:
            report = assert_batch_invariant(eng, mode=mode, trials=TRIALS[mode], max_batch=16)
            print(report.render())
        except (KnownLimitation, NotApplicable) as exc:  # the capability data's verdicts, not failures
            print(f"{type(exc).__name__}: {exc}")
        except AssertionError as exc:
            print(exc)
            if mode == "p_vs_d":
                print("score entries (logprob, id):", [e[:2] for e in getattr(eng, "last_score_entries", [])][:12])
            failed.append(mode)
    assert not failed, f"modes failing with deterministic inference on: {failed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_control_with_flag_off(engine_factory, backend):
    eng = engine_factory("sglang", attention_backend=backend, deterministic=False)
    print(f"\nsglang [{backend}] NON-deterministic engine healthy after {eng.startup_seconds:.1f} s")
    report = negative_control(eng, "single", trials=16,
                              params=SamplingParams(temperature=0.0, max_new_tokens=8))
    print(report.render(limit=4))
