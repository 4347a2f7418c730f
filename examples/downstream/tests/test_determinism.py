import pytest

from pytest_miles import assert_batch_invariant, assert_checkpoints_equal


def test_rollout_is_batch_invariant(engine):
    """The embedded engine on CPU; `--miles-engine=sglang` on a GPU host."""
    assert_batch_invariant(engine, mode="single", trials=4, prompt_len=16)


@pytest.mark.hopper
def test_training_is_bitwise_reproducible(megatron_trainer_factory, tmp_path):
    a = megatron_trainer_factory(seed=1234).train(2, save_dir=tmp_path / "run1")
    b = megatron_trainer_factory(seed=1234).train(2, save_dir=tmp_path / "run2")
    assert_checkpoints_equal(a.checkpoint(2), b.checkpoint(2))
