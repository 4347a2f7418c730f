"""Issue 19's CPU side: what several GPUs will run, shown where it can be (gloo, the engine's GPU
count from SGLang's tensor-parallel flags). The GPU runs are tests/gpu/test_gpu_multigpu.py."""

from __future__ import annotations

import pytest

from pytest_miles.engines.factory import EngineSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A folder the spec accepts as an HF model (it checks for config.json); nothing starts."""
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text("{}")
    return str(path)


def _spec(model_dir: str, kind: str = "sglang", extra_args: tuple[str, ...] = (), **options) -> EngineSpec:
    return EngineSpec(kind=kind, model_dir=model_dir, deterministic=True, attention_backend="triton",
                      extra_args=extra_args, options=options, device="cuda", log_dir="l", startup_timeout=1.0)


@pytest.mark.parametrize(("extra_args", "options", "gpus"), [
    ((), {}, 1),
    (("--tp", "2"), {}, 2),
    (("--tp-size=4",), {}, 4),
    (("--tensor-parallel-size", "8"), {}, 8),
    (("--tp", "2", "--tp", "4"), {}, 4),  # the last flag wins, as in argparse
    ((), {"tp_size": 2}, 2),
])
def test_an_sglang_engine_leases_as_many_gpus_as_its_tensor_parallel_size(model_dir, extra_args, options,
                                                                           gpus):
    assert _spec(model_dir, extra_args=extra_args, **options).gpus == gpus
    assert _spec(model_dir, "sglang-offline", extra_args=extra_args, **options).gpus == gpus


def test_a_bad_tensor_parallel_size_is_named(model_dir):
    with pytest.raises(ValueError, match=r"SGLang argument --tp: 'two' is not an integer"):
        _ = _spec(model_dir, extra_args=("--tp", "two")).gpus


def test_reference_engines_hold_one_gpu_on_cuda_and_none_on_cpu(model_dir):
    assert _spec(model_dir, "reference").gpus == 1
    assert EngineSpec(kind="reference", model_dir=model_dir, deterministic=True, attention_backend="triton",
                      extra_args=(), options={}, device="cpu", log_dir="l", startup_timeout=1.0).gpus == 0


@pytest.mark.slow
def test_data_parallel_two_is_bitwise_equal_to_itself(tmp_path):
    """world 2, tensor parallel 1: two data-parallel ranks (gradients all-reduced over gloo here,
    over NCCL with NCCL_ALGO=Ring on GPUs)."""
    pytest.importorskip("megatron.core")
    from pytest_miles import assert_runs_bitwise_equal
    from pytest_miles.trainers.megatron import MegatronTrainer

    runs = [MegatronTrainer(seed=5, world_size=2, log_dir=tmp_path).train(2, save_dir=tmp_path / f"dp{i}")
            for i in range(2)]
    assert len(runs[0].losses) == 2
    assert_runs_bitwise_equal(*runs)
