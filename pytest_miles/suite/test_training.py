"""Training reproducibility on real megatron-core: run twice, resume, checkpoint equality."""

from __future__ import annotations

import pytest

from pytest_miles import assert_resume_equivalent, compare_checkpoints, runs_difference
from pytest_miles.suite.conftest import SECOND_RUN, require


@pytest.fixture
def trainer_factory(megatron_trainer_factory, miles_settings):
    require("megatron.core", "megatron")
    tp = miles_settings("tensor_parallel")
    return lambda **kw: megatron_trainer_factory(tensor_parallel=tp, **kw)


@pytest.fixture
def STEPS(miles_settings):  # noqa: N802  (reads like the constant it replaces)
    return miles_settings("train_steps")


# The second run's ranks are other processes than the first's (SECOND_RUN: a pool group of their own). Two runs
# in one process would share what a process keeps and a fresh one decides anew (autotuned kernels,
# communicator set-up, hash seeds): the check is two independent runs.


def test_run_twice_bitwise_equal(trainer_factory, tmp_path, miles_record, STEPS):  # noqa: N803
    a = trainer_factory(seed=1234).train(STEPS, save_dir=tmp_path / "run1")
    b = trainer_factory(seed=1234, env=SECOND_RUN).train(STEPS, save_dir=tmp_path / "run2")
    if a.pid == b.pid:
        raise AssertionError(f"run twice: both runs came from rank processes with pid {a.pid}; the check needs two "
                             "independent runs")
    report = compare_checkpoints(tmp_path / "run1", tmp_path / "run2")
    diff = runs_difference(a, b)
    miles_record(f"megatron run twice ({a.device})", steps=STEPS, final_loss=a.losses[-1],
                 checkpoint_items=report.tensors_compared, step_seconds=round(sum(a.step_times) / len(a.step_times), 3),
                 process_runs=[a.process_run, b.process_run], pids=[a.pid, b.pid])  # > 1: pooled ranks
    if diff is not None:
        raise AssertionError(diff)


def test_resume_equivalent(trainer_factory, tmp_path, miles_record, STEPS):  # noqa: N803
    straight, _, resumed = assert_resume_equivalent(trainer_factory, STEPS, tmp_path, seed=1234)
    miles_record(f"megatron resume {STEPS // 2}+{STEPS - STEPS // 2} == {STEPS} straight ({straight.device})",
                 final_loss=resumed.losses[-1])


def test_checkpoint_check_can_fail(trainer_factory, tmp_path, miles_record):
    """Negative control: a different seed must be caught, naming the first tensor."""
    a = trainer_factory(seed=1234).train(2, save_dir=tmp_path / "a")
    b = trainer_factory(seed=4321).train(2, save_dir=tmp_path / "b")
    report = compare_checkpoints(a.checkpoint(), b.checkpoint(), first=True)
    miles_record("checkpoint check catches a different seed",
                 first_difference=report.first.name if report.first else None)
    if report.equal:
        raise AssertionError("checkpoints of different seeds compared equal: the check cannot fail here")
