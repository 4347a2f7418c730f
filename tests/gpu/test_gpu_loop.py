"""The RL loop on the GPU host: a real SGLang server (flashinfer, --enable-deterministic-inference,
the engine's default CUDA-graph setting) and real megatron-core (local spec, fp32 parameters;
weights go to SGLang as bf16 HF checkpoints) on one GPU, 3 iterations twice.

One SGLang engine serves both deterministic runs: the loop pushes the initial weights back
(POST /update_weights_from_disk) before each run, which saves a second cold start (flashinfer
JIT ~160 s). The flag-off control starts a second engine. Run:
`scripts/gpu-host.sh loop` (or `pytest tests/gpu/test_gpu_loop.py -v -s --miles-require-gpu`)."""

from __future__ import annotations

import pytest

from pytest_miles.scenarios.loop import assert_loops_bitwise_equal, first_divergence

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
ITERATIONS = 3


def _timings(run) -> str:
    per = run.stage_seconds()
    return ", ".join(f"{k} {v:.2f} s" for k, v in per.items())


@pytest.fixture(scope="module")
def first_run(rl_loop_factory):
    run = rl_loop_factory("sglang", iterations=ITERATIONS, seed=1234, name="run1")
    print(f"\nrun1 ({ITERATIONS} iterations) stage totals: {_timings(run)}")
    for r in run.records:
        print(f"  iteration {r.iteration}: loss {r.loss!r}, grad norm {r.grad_norm!r}, "
              f"train_rollout_logprob_abs_diff {r.train_rollout_logprob_abs_diff:.3e}, "
              f"rewards {r.rewards}, seconds {({k: round(v, 2) for k, v in r.seconds.items()})}")
    return run


def test_sglang_megatron_loop_twice_bitwise_equal(rl_loop_factory, first_run, engine_factory):
    launches = engine_factory.launches
    again = rl_loop_factory("sglang", iterations=ITERATIONS, seed=1234, name="run2")
    print(f"\nrun2 stage totals: {_timings(again)} (engine reused: {engine_factory.launches == launches})")
    assert_loops_bitwise_equal(first_run, again)
    print(f"rollouts, rewards, losses, grad norms, checkpoints and pushed weights bitwise equal at all "
          f"{ITERATIONS} iterations")


def test_sglang_flag_off_diverges_at_rollout(rl_loop_factory, first_run):
    """Negative control: the same loop with SGLang's deterministic flag off must be reported at
    the rollout stage (of the first iteration whose batch differs)."""
    off = rl_loop_factory("sglang", iterations=ITERATIONS, seed=1234, engine_deterministic=False, name="flag-off")
    print(f"\nflag-off stage totals: {_timings(off)}")
    found = first_divergence(first_run, off)
    assert found is not None, "the loop with SGLang's flag off equals the deterministic one: the control cannot fail"
    print(found.render("deterministic", "flag-off"))
    assert found.stage == "rollout", found.render()
