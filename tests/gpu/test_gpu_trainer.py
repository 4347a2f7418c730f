"""Real megatron-core on the GPU host (NCCL): run twice, resume, a different seed, and the
checkpoint comparison on the real torch_dist iteration dirs."""

from __future__ import annotations

import pytest

from pytest_miles import assert_checkpoints_equal, assert_resume_equivalent, assert_runs_bitwise_equal
from pytest_miles.checks.checkpoints import compare_checkpoints

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
STEPS = 6


def test_two_gpu_runs_equal_and_different_seed_pinpointed(megatron_trainer_factory, tmp_path):
    a = megatron_trainer_factory(seed=1234).train(STEPS, save_dir=tmp_path / "run1")
    b = megatron_trainer_factory(seed=1234).train(STEPS, save_dir=tmp_path / "run2")
    assert a.device == "cuda"
    print(f"\nrun1 losses {a.losses}\nrun2 losses {b.losses}")
    print("iteration dir:", sorted(p.name for p in a.checkpoint().iterdir()))
    assert_runs_bitwise_equal(a, b)
    print(assert_checkpoints_equal(tmp_path / "run1", tmp_path / "run2").render())
    c = megatron_trainer_factory(seed=4321).train(STEPS, save_dir=tmp_path / "run3")
    report = compare_checkpoints(a.checkpoint(), c.checkpoint())
    print(report.render())
    assert not report.equal and report.first.name.startswith("model.")


def test_gpu_resume_equivalence(megatron_trainer_factory, tmp_path):
    straight, _, resumed = assert_resume_equivalent(megatron_trainer_factory, STEPS, tmp_path, seed=99)
    print(f"\nstraight {straight.losses}\nresumed  {resumed.losses}")
