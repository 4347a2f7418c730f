"""Real megatron-core 0.16.1 on CPU (gloo): reproducibility, TP=2, resume, negative controls, bad input."""

from __future__ import annotations

import psutil
import pytest

pytest.importorskip("megatron.core")

from pytest_miles import assert_resume_equivalent, assert_runs_bitwise_equal  # noqa: E402
from pytest_miles.scenarios.runs import runs_difference  # noqa: E402
from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs, TrainerError  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    a = MegatronTrainer(seed=1234, log_dir=root / "logs").train(STEPS, save_dir=root / "run1")
    b = MegatronTrainer(seed=1234, log_dir=root / "logs").train(STEPS, save_dir=root / "run2")
    return a, b


def test_two_runs_are_bitwise_equal(run_pair):
    a, b = run_pair
    assert len(a.losses) == STEPS and a.loss_bits == b.loss_bits and a.grad_norm_bits == b.grad_norm_bits
    assert sorted(p.name for p in a.checkpoint(STEPS).iterdir()) == [
        ".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert_runs_bitwise_equal(a, b)


def test_different_seed_is_caught_and_pinpointed(run_pair, tmp_path):
    a, _ = run_pair
    c = MegatronTrainer(seed=4321, log_dir=tmp_path).train(STEPS, save_dir=tmp_path / "run3")
    with pytest.raises(AssertionError) as exc:
        assert_runs_bitwise_equal(a, c)
    text = str(exc.value)
    assert "first differing step: 1: loss" in text
    assert "checkpoint iter_0000004: first differing tensor model.embedding.word_embeddings.weight" in text


def test_tensor_parallel_two_is_equal_to_itself(tmp_path):
    runs = [MegatronTrainer(seed=7, tensor_parallel=2, log_dir=tmp_path).train(3, save_dir=tmp_path / f"tp{i}")
            for i in range(2)]
    names = sorted(p.name for p in runs[0].checkpoint().iterdir())
    assert "__0_0.distcp" in names and "__1_0.distcp" in names, names
    assert_runs_bitwise_equal(*runs)


def test_resume_is_equivalent_to_an_uninterrupted_run(tmp_path):
    straight, first, second = assert_resume_equivalent(
        lambda **kw: MegatronTrainer(seed=11, log_dir=tmp_path, **kw), STEPS, tmp_path)
    assert second.first_step == STEPS // 2 and len(second.losses) == STEPS - STEPS // 2
    assert straight.loss_bits[STEPS // 2:] == second.loss_bits


def test_fixture_runs_megatron(pytester):
    pytester.makepyfile("""
        from pytest_miles import assert_runs_bitwise_equal
        from pytest_miles.trainers.config import TrainerConfig

        def test_twice(megatron_trainer_factory, tmp_path):
            by_keywords = megatron_trainer_factory(seed=3)
            # the same run, spelled as a config
            by_config = megatron_trainer_factory(config=TrainerConfig(seed=3))
            assert by_config.config == by_keywords.config and by_config.log_dir == by_keywords.log_dir
            a = by_keywords.train(2, save_dir=tmp_path / "a")
            b = by_config.train(2, save_dir=tmp_path / "b")
            assert a.device == "cpu"
            assert_runs_bitwise_equal(a, b)
    """)
    pytester.runpytest_subprocess("--miles-gpu-class=none").assert_outcomes(passed=1)


# ---- bad input ---------------------------------------------------------------------------------


def test_invalid_parallel_sizes():
    with pytest.raises(TrainerError, match="world_size 3 is not a multiple of tensor_parallel 2"):
        MegatronTrainer(tensor_parallel=2, world_size=3)
    with pytest.raises(TrainerError, match="tensor_parallel 3 does not divide the attention heads"):
        MegatronTrainer(tensor_parallel=3)


def test_unwritable_save_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrainerError, match="save_dir .*a-file/sub: not writable"):
        MegatronTrainer(log_dir=tmp_path).train(1, save_dir=blocker / "sub")


def test_missing_checkpoint_to_resume(tmp_path):
    with pytest.raises(TrainerError, match="no latest_checkpointed_iteration.txt, nothing to resume from"):
        MegatronTrainer(log_dir=tmp_path).train(2, load_dir=tmp_path)


def test_crashing_trainer_gives_log_tail_and_leaves_nothing(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    bad = MegatronTrainer(tensor_parallel=2, model=ModelArgs(vocab_size=0), log_dir=tmp_path)
    with pytest.raises(TrainerError, match=r"megatron rank \d exited with code 1 \(log .*rank\d\.log\):\n(.|\n)*Error"):
        bad.train(1)
    from pytest_miles.placement.ownership import watchdog_pid

    after = {p.pid for p in psutil.Process().children(recursive=True)} - {watchdog_pid()}
    assert after <= before, f"leftover processes: {after - before}"


def test_runs_difference_on_disjoint_runs(run_pair):
    a, _ = run_pair
    from dataclasses import replace

    assert "share no step" in runs_difference(a, replace(a, first_step=100))
