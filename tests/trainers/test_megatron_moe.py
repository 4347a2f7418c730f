"""megatron-core's MoE layer on CPU over gloo (the host router of trainers/moe_router.py, the
allgather dispatcher): the tiny-moe shape trained twice is bitwise equal, checkpoints included, and
its forward routes the same tokens to the same experts as the embedded reference engine on the
same HF weights (rollout vs trainer)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

pytest.importorskip("megatron.core")

from pytest_miles import assert_routing_equal, assert_runs_bitwise_equal  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.errors import TrainerError  # noqa: E402
from pytest_miles.models.moe import MOE_SHAPES, write_moe_checkpoint  # noqa: E402
from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs  # noqa: E402

STEPS = 2


@pytest.mark.slow
def test_moe_training_twice_is_bitwise_equal(megatron_trainer_factory, tmp_path):
    a, b = (megatron_trainer_factory(seed=1234, model="tiny-moe").train(STEPS, save_dir=tmp_path / f"run{i}")
            for i in (1, 2))
    assert len(a.losses) == STEPS and a.loss_bits == b.loss_bits and a.grad_norm_bits == b.grad_norm_bits
    assert_runs_bitwise_equal(a, b)
    from torch.distributed.checkpoint import FileSystemReader

    sizes = {k: tuple(getattr(v, "size", ())) for k, v in
             FileSystemReader(str(a.checkpoint(STEPS))).read_metadata().state_dict_metadata.items()}
    # the MoE layer was trained and saved as global tensors with an expert axis: [layers, experts, ...]
    assert sizes["model.decoder.layers.mlp.router.weight"] == (2, 8, 128)
    assert sizes["model.decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 8, 128, 128)


@pytest.mark.slow
def test_trainer_forward_routes_like_the_reference_engine(tmp_path):
    cfg = MOE_SHAPES["tiny-moe"]
    hf = write_moe_checkpoint(tmp_path / "hf", cfg, dtype="float32")
    tokens = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 1, 2]
    model = ModelArgs.qwen3_moe(cfg, seq_length=32, rotary_interleaved=True)  # the reference engine's RoPE
    with MegatronTrainer(seed=1, model=model, log_dir=tmp_path / "logs").session(
            init_hf=hf, hf_config=asdict(cfg)) as session:
        (trainer,) = session.routing([{"tokens": tokens, "prompt_len": 4}])
    with ReferenceEngine(hf, deterministic=True) as eng:
        rollout = eng.routing(tokens)
    report = assert_routing_equal(rollout, trainer)
    assert (report.tokens, report.layers) == (len(tokens), 2)
    assert trainer.scores is not None and trainer.source == "megatron-core forward"


def test_a_model_shape_name_is_accepted_and_a_wrong_one_refused():
    assert MegatronTrainer(model="tiny-moe").model.num_moe_experts == 8
    with pytest.raises(TrainerError, match="shape .tiny-mo. is not accepted.*tiny-moe"):
        MegatronTrainer(model="tiny-mo")
