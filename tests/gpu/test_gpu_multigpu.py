"""Issue 19 on a host with at least 2 GPUs (not run yet: no multi-GPU host was lent; see
docs/validation/multigpu.md). `scripts/gpu-host.sh multigpu` runs it on nvidia-h200-x2.

- megatron-core tensor parallel 2 and data parallel 2 over real NCCL, twice each with
  NCCL_ALGO=Ring: bitwise equal losses, grad norms and checkpoints; then with NCCL_ALGO unset and
  =Tree: what the checks and the doctor say is printed (a divergence or a pass), not asserted;
- SGLang `--tp 2` with --enable-deterministic-inference: every mode judged by the capability data
  (promised: hard; known limitation: XFAIL);
- the RL loop with the engine on one GPU and the trainer on the other, twice, bitwise.
GPU leases with two GPUs under `pytest -n 2`: tests/gpu/test_gpu_leases.py (same step)."""

from __future__ import annotations

import pytest

from pytest_miles import assert_runs_bitwise_equal
from pytest_miles.checks.batch_invariance import MODES, assert_batch_invariant
from pytest_miles.scenarios.runs import runs_difference

pytestmark = [pytest.mark.gpus(2), pytest.mark.timeout(1200)]
STEPS = 4


@pytest.mark.parametrize(("tp", "world"), [(2, 2), (1, 2)], ids=["tensor-parallel-2", "data-parallel-2"])
def test_two_gpus_twice_bitwise_with_ring(megatron_trainer_factory, tmp_path, tp, world):
    env = {"NCCL_ALGO": "Ring"}
    runs = [megatron_trainer_factory(seed=7, tensor_parallel=tp, world_size=world, env=env)
            .train(STEPS, save_dir=tmp_path / f"run{i}") for i in range(2)]
    print(f"\nTP {tp} world {world} NCCL_ALGO=Ring losses {runs[0].losses}")
    assert_runs_bitwise_equal(*runs)


@pytest.mark.parametrize("algo", [None, "Tree"], ids=["unset", "tree"])
def test_two_gpus_without_ring_reported(megatron_trainer_factory, tmp_path, algo):
    """Not a pass/fail of determinism: prints whether two runs still agree and what the doctor says."""
    from pytest_miles.facts.doctor import check_env_var

    env = {"NCCL_ALGO": algo} if algo else {"NCCL_ALGO": ""}  # "": NCCL chooses (as if unset)
    runs = [megatron_trainer_factory(seed=7, tensor_parallel=2, world_size=2, env=env)
            .train(STEPS, save_dir=tmp_path / f"run{i}") for i in range(2)]
    diff = runs_difference(*runs)
    print(f"\nNCCL_ALGO={algo!r}: two TP-2 runs {'DIFFER: ' + diff if diff else 'bitwise equal'}")
    print("doctor:", check_env_var("NCCL_ALGO", {"NCCL_ALGO": algo} if algo else {}).line())


def test_sglang_tp2_every_mode(engine_factory, miles_settings):
    eng = engine_factory("sglang", attention_backend=miles_settings("attention_backend"), extra_args=["--tp", "2"])
    from pytest_miles.capabilities.verdict import KnownLimitation, NotApplicable

    outcomes = {}
    for mode in MODES:
        try:
            assert_batch_invariant(eng, mode=mode, trials=miles_settings("trials"))
            outcomes[mode] = "passed"
        except (KnownLimitation, NotApplicable) as exc:
            outcomes[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    print(f"\nsglang --tp 2 ({miles_settings('attention_backend')}): {outcomes}")


def test_loop_engine_on_one_gpu_trainer_on_the_other(rl_loop_factory, miles_settings):
    """Run with --miles-gpu-lease on: the engine holds its leased GPU for its life, so the
    trainer's lease gets the other one."""
    import subprocess

    from pytest_miles.scenarios.loop import assert_loops_bitwise_equal

    if miles_settings("gpu_lease") != "on":
        pytest.skip("needs --miles-gpu-lease on (engine and trainer on different GPUs)")
    a = rl_loop_factory("sglang", iterations=3, seed=1234, name="split-1")
    print(subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv"], capture_output=True,
                         text=True).stdout)
    b = rl_loop_factory("sglang", iterations=3, seed=1234, name="split-2")
    assert_loops_bitwise_equal(a, b)
