"""TrainerPool: megatron-core ranks kept between runs, every run as independent as a fresh process's.

Real megatron-core 0.16.1 on gloo, no mocks. A pooled run must equal a fresh-process run bit for bit
(losses, grad norms, checkpoints), after other runs of another seed and another parallel layout in the
same processes and after a state leak planted in them on purpose; the negative control leaves the leak
and skips the reset that undoes it, and the same comparison must catch it.
"""

from __future__ import annotations

import psutil
import pytest

pytest.importorskip("megatron.core")

from pytest_miles import assert_resume_equivalent  # noqa: E402
from pytest_miles.scenarios.runs import runs_difference  # noqa: E402
from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs, TrainerError  # noqa: E402
from pytest_miles.trainers.pool import TrainerPool, pool_refusal  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The reference: seed 1234 on tensor parallel 2, in rank processes started for it."""
    root = tmp_path_factory.mktemp("fresh")
    run = MegatronTrainer(seed=1234, tensor_parallel=2, log_dir=root / "logs").train(STEPS, save_dir=root / "run")
    assert run.process_run == 1
    return run


@pytest.fixture
def pool(tmp_path):
    with TrainerPool(tmp_path / "pool") as p:
        yield p


def _pool_pids(pool: TrainerPool) -> set[int]:
    return {p.pid for g in pool.groups.values() for p in g.procs}


def test_pooled_runs_equal_a_fresh_run_bitwise(fresh, pool, tmp_path):
    """Run 1 (seed 1234, TP 2), run 2 (seed 4321, data parallel 2: another parallel_state layout),
    a planted leak (every RNG reseeded, deterministic algorithms off), run 3 (seed 1234, TP 2):
    runs 1 and 3 equal the fresh-process run bit for bit, in the same two processes."""
    make = lambda seed, **kw: MegatronTrainer(seed=seed, log_dir=tmp_path / "logs", pool=pool, **kw)  # noqa: E731
    first = make(1234, tensor_parallel=2).train(STEPS, save_dir=tmp_path / "first")
    pids = _pool_pids(pool)
    other = make(4321, world_size=2).train(STEPS, save_dir=tmp_path / "other")
    pool.plant(make(1234, tensor_parallel=2), 987654321)
    third = make(1234, tensor_parallel=2).train(STEPS, save_dir=tmp_path / "third")
    assert (first.process_run, other.process_run, third.process_run) == (1, 2, 3)
    assert _pool_pids(pool) == pids and len(pids) == 2, "the runs did not share the pooled processes"
    assert runs_difference(fresh, first, label_a="fresh", label_b="pooled run 1") is None
    assert runs_difference(fresh, third, label_a="fresh", label_b="pooled run 3") is None
    assert fresh.loss_bits == third.loss_bits and fresh.grad_norm_bits == third.grad_norm_bits
    assert runs_difference(fresh, other, compare_checkpoints_too=False) is not None  # another seed differs


class _LeakyTrainer(MegatronTrainer):
    """Negative control only: its runs skip the RNG reset a pooled run starts with."""

    def spec(self) -> dict:
        return {**super().spec(), "skip_resets": ["rng"]}


def test_negative_control_a_leak_the_reset_skips_is_caught(fresh, pool, tmp_path):
    """A pooled run that keeps the planted RNG state (its reset skipped) must differ from the fresh
    run, and the comparison must say where: the check that pooled runs are independent can fail."""
    leaky = _LeakyTrainer(seed=1234, tensor_parallel=2, log_dir=tmp_path / "logs", pool=pool)
    pool.plant(leaky, 987654321)
    run = leaky.train(STEPS, save_dir=tmp_path / "leaky")
    diff = runs_difference(fresh, run, label_a="fresh", label_b="pooled, leak kept")
    assert diff is not None, "a planted RNG leak went unseen: the independence check cannot fail"
    assert "first differing step: 1" in diff and "first differing tensor model." in diff, diff


def test_resume_through_the_pool(fresh, pool, tmp_path):
    """Straight, first half, resumed second half: three runs in one group of processes; the resumed
    run equals the straight one, which equals the fresh-process run."""
    straight, first, second = assert_resume_equivalent(
        lambda **kw: MegatronTrainer(log_dir=tmp_path / "logs", pool=pool, tensor_parallel=2, **kw), STEPS,
        tmp_path, seed=1234)
    assert [r.process_run for r in (straight, first, second)] == [1, 2, 3]
    assert runs_difference(fresh, straight) is None


def test_failed_pooled_run_ends_its_group_and_leaves_nothing(fresh, pool, tmp_path):
    """A run that crashes in the pooled ranks: TrainerError with the rank's log tail, the group
    killed (never reused), no process left; the next run starts a fresh group and is exact."""
    from pytest_miles.placement.ownership import watchdog_pid

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    good = MegatronTrainer(seed=1234, tensor_parallel=2, log_dir=tmp_path / "logs", pool=pool)
    good.train(1)
    bad = MegatronTrainer(tensor_parallel=2, model=ModelArgs(vocab_size=0), log_dir=tmp_path / "logs", pool=pool)
    with pytest.raises(TrainerError, match=r"pooled megatron rank \d exited with code 1 in run 2 of its processes "
                                           r"\(log .*rank\d\.log\):\n(.|\n)*Error"):
        bad.train(1)
    assert not pool.groups
    after = {p.pid for p in psutil.Process().children(recursive=True)} - {watchdog_pid()}
    assert after <= before, f"leftover processes: {after - before}"
    again = good.train(STEPS, save_dir=tmp_path / "again")
    assert again.process_run == 1 and runs_difference(fresh, again) is None


def test_what_the_pool_leaves_to_fresh_processes(tmp_path):
    pool = TrainerPool(tmp_path)
    assert pool_refusal(MegatronTrainer(pool=pool)) is None
    assert "Ray" in pool_refusal(MegatronTrainer(pool=pool, launcher=object()))
    cuda_leased = MegatronTrainer(pool=pool, device="cuda", gpu_lease=lambda n, owner: None)
    assert "pytest-xdist" in pool_refusal(cuda_leased)


def test_fixture_reuses_ranks_unless_told_not_to(pytester):
    """megatron_trainer_factory trains on the session's pool by default: the second run, and the run
    of the next test, reuse the first run's processes; --miles-trainer-reuse=off launches every run
    fresh."""
    pytester.makepyfile("""
        import os
        from pytest_miles import assert_runs_bitwise_equal

        def test_twice(megatron_trainer_factory, miles_trainer_pool, tmp_path):
            a = megatron_trainer_factory(seed=3).train(2, save_dir=tmp_path / "a")
            b = megatron_trainer_factory(seed=3).train(2, save_dir=tmp_path / "b")
            assert_runs_bitwise_equal(a, b)
            expected = [1, 1] if os.environ["REUSE"] == "off" else [1, 2]
            assert [a.process_run, b.process_run] == expected
            assert (miles_trainer_pool is None) == (os.environ["REUSE"] == "off")

        def test_next_test(megatron_trainer_factory):  # pytest's current-test variable changed meanwhile
            run = megatron_trainer_factory(seed=3).train(1)
            assert run.process_run == (1 if os.environ["REUSE"] == "off" else 3)
    """)
    for reuse in ("on", "off"):
        pytester._monkeypatch.setenv("REUSE", reuse)
        pytester.runpytest_subprocess("-p", "no:randomly", "--miles-gpu-class=none",
                                      f"--miles-trainer-reuse={reuse}").assert_outcomes(passed=2)


def test_least_recently_used_group_closes_past_max_groups(pool, tmp_path):
    """A third rank environment closes the group used least recently (its ranks end); the other stays."""
    make = lambda tag: MegatronTrainer(seed=1, env={"MILES_POOL_TAG": tag}, log_dir=tmp_path, pool=pool)  # noqa: E731
    make("a").train(1)
    make("b").train(1)
    first = next(iter(pool.groups.values()))
    assert make("a").train(1).process_run == 2  # "a" is now the most recently used; "b" the least
    make("c").train(1)
    assert len(pool.groups) == 2 and first in pool.groups.values()
    assert make("b").train(1).process_run == 1, "the closed group was reused"
    with pytest.raises(ValueError, match=r"max_groups=\): 0 is not accepted; expected an integer >= 1"):
        TrainerPool(tmp_path, max_groups=0)
