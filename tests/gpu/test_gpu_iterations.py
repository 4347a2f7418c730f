"""First diverging iteration on real Megatron runs (NCCL on the GPU host): two runs saved every
2 iterations compare equal at every iteration; a third that draws different data from iteration
3 on is reported as first diverging at iteration 4 (the first saved at or after 3), with its
first differing tensor."""

from __future__ import annotations

import pytest

from pytest_miles import assert_checkpoints_equal
from pytest_miles.checks.iterations import first_diverging_iteration

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
STEPS, SAVE = 6, [2, 4, 6]


def test_first_diverging_iteration_on_gpu(megatron_trainer_factory, tmp_path):
    a = megatron_trainer_factory(seed=1234).train(STEPS, save_dir=tmp_path / "run1", save_steps=SAVE)
    megatron_trainer_factory(seed=1234).train(STEPS, save_dir=tmp_path / "run2", save_steps=SAVE)
    c = megatron_trainer_factory(seed=1234, data_seed_from_step=(3, 4321)).train(
        STEPS, save_dir=tmp_path / "run3", save_steps=SAVE)
    assert a.device == "cuda"
    walk = assert_checkpoints_equal(tmp_path / "run1", tmp_path / "run2", iterations="all")
    print("\n" + walk.render())
    assert walk.compared == SAVE
    assert a.loss_bits[:2] == c.loss_bits[:2] and a.loss_bits[2] != c.loss_bits[2], "run3 departs at iteration 3"
    walk = first_diverging_iteration(tmp_path / "run1", tmp_path / "run3")
    print(walk.render())
    assert walk.first_diverging == 4 and walk.compared == [2, 4]
    assert walk.first_tensor and walk.first_tensor.startswith("model."), walk.first_tensor
