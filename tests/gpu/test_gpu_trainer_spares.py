"""Real megatron-core on the GPU host (NCCL): rank processes started in the background on CUDA (a spare
for a session, a prestarted group for runs) compute what ranks started for them compute, bit for bit,
and say how long their start took (what the suite hides behind its other tests)."""

from __future__ import annotations

import pytest

from pytest_miles.recording import finished_stages
from pytest_miles.trainers.megatron import MegatronTrainer
from pytest_miles.trainers.pool import TrainerPool
from tests.trainers.test_session_spares import exercise

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


def test_cuda_spares_and_prestarted_groups_equal_ranks_started_for_them(tmp_path):
    with MegatronTrainer(seed=7, device="cuda", log_dir=tmp_path / "fresh").session() as s:
        fresh = exercise(s)
    reference = MegatronTrainer(seed=3, device="cuda", log_dir=tmp_path / "fresh-run").train(4)
    with TrainerPool(tmp_path / "pool") as pool:
        session_trainer = MegatronTrainer(seed=7, device="cuda", log_dir=tmp_path / "logs", pool=pool)
        run_trainer = MegatronTrainer(seed=3, device="cuda", log_dir=tmp_path / "logs", pool=pool)
        pool.prestart_sessions(session_trainer, 1)
        pool.prestart(run_trainer)
        finished_stages()
        with session_trainer.session() as s:
            assert exercise(s) == fresh
        run = run_trainer.train(4)
        assert run.process_run == 1 and run.device == "cuda"
        assert (run.loss_bits, run.grad_norm_bits) == (reference.loss_bits, reference.grad_norm_bits)
        stages = finished_stages()
    print("\n" + "\n".join(f"{label}: {seconds:.1f} s" for label, seconds in stages))
    assert sum(label.startswith("starting megatron-core ranks (1 on cuda") for label, _ in stages) == 2, stages
