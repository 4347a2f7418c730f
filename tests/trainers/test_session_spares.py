"""Rank processes started in the background (TrainerPool.prestart, prestart_sessions): a spare serves one
MegatronSession exactly as ranks started for it would (bit for bit), a prestarted group serves the first
run, the wait and the start are stages of the report, and a spare is never shared, handed to another rank
environment, or kept past the pool.

Real megatron-core 0.16.1 on gloo, no mocks; the lost port race is a named fault injection.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from pytest_miles.recording import finished_stages  # noqa: E402
from pytest_miles.trainers.megatron import MegatronTrainer  # noqa: E402
from pytest_miles.trainers.pool import TrainerPool, session_refusal  # noqa: E402
from tests.helpers.port_race import first_port_taken  # noqa: E402

pytestmark = pytest.mark.slow
SAMPLES = [{"tokens": [5, 17, 42, 99, 7, 3, 250, 11, 64, 9], "prompt_len": 4},
           {"tokens": [8, 1, 300, 2, 77, 15, 6], "prompt_len": 3}]


def exercise(session) -> tuple:
    """What a session computes: logprobs, one GRPO step, logprobs after it (floats as hex: bit for bit)."""
    before = session.logprobs(SAMPLES)
    step = session.train_step([{**s, "advantage": a, "old_logprobs": lp}
                               for s, a, lp in zip(SAMPLES, (1.0, -0.5), before)])
    after = session.logprobs(SAMPLES)
    return [[x.hex() for x in row] for row in before + after], step["loss"], step["grad_norm"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The reference: a session of seed 7 on two data-parallel ranks, in rank processes started for it."""
    with MegatronTrainer(seed=7, world_size=2, log_dir=tmp_path_factory.mktemp("fresh")).session() as s:
        return exercise(s)


@pytest.fixture
def pool(tmp_path):
    with TrainerPool(tmp_path / "pool") as p:
        yield p


def test_a_session_on_a_spare_equals_one_on_its_own_ranks(fresh, pool, tmp_path):
    trainer = MegatronTrainer(seed=7, world_size=2, log_dir=tmp_path / "logs", pool=pool)
    assert len(pool.prestart_sessions(trainer, 2)) == 2
    spares = [g for stock in pool.spares.values() for g in stock]
    pids = [{p.pid for p in g.procs} for g in spares]
    finished_stages()
    with trainer.session() as first:
        assert {p.pid for p in first.procs} == pids[0], "the session did not run on the first spare"
        assert exercise(first) == fresh
    with trainer.session() as second:  # the next session: the second spare, never the first one again
        assert {p.pid for p in second.procs} == pids[1]
        assert exercise(second) == fresh
    assert not any(pool.spares.values())
    with trainer.session() as third:  # none left: ranks of its own, as without a pool
        assert {p.pid for p in third.procs}.isdisjoint(pids[0] | pids[1])
    labels = [label for label, _ in finished_stages()]
    assert sum(x.startswith("starting megatron-core ranks (2 on cpu") and x.endswith("in the background")
               for x in labels) == 2, labels
    assert sum(x.startswith("waiting for megatron-core ranks") for x in labels) == 2, labels


def test_a_prestarted_group_serves_the_first_run(pool, tmp_path):
    trainer = MegatronTrainer(seed=3, log_dir=tmp_path / "logs", pool=pool)
    label = pool.prestart(trainer)
    assert label and "in the background" not in label and pool.prestart(trainer) is None  # one group per env
    pids = {p.pid for g in pool.groups.values() for p in g.procs}
    finished_stages()
    run = trainer.train(2)
    assert run.process_run == 1 and {run.pid} <= pids
    assert any(x.startswith(f"starting {label}") for x, _ in finished_stages())
    reference = MegatronTrainer(seed=3, log_dir=tmp_path / "fresh").train(2)
    assert (run.loss_bits, run.grad_norm_bits) == (reference.loss_bits, reference.grad_norm_bits)


def test_a_spare_serves_only_its_own_environment(pool, tmp_path):
    mine = MegatronTrainer(seed=1, log_dir=tmp_path / "logs", pool=pool)
    other = MegatronTrainer(seed=1, log_dir=tmp_path / "logs", pool=pool, env={"MILES_OTHER": "1"})
    pool.prestart_sessions(mine, 1)
    spare = next(iter(pool.spares.values()))[0]
    with other.session() as s:
        assert {p.pid for p in s.procs}.isdisjoint(p.pid for p in spare.procs)
    assert spare.procs and all(p.poll() is None for p in spare.procs)


def test_the_pool_ends_its_spares(tmp_path):
    pool = TrainerPool(tmp_path / "pool")
    pool.prestart_sessions(MegatronTrainer(seed=1, log_dir=tmp_path / "logs", pool=pool), 1)
    procs = [p for stock in pool.spares.values() for g in stock for p in g.procs]
    pool.close()
    assert procs and all(p.poll() is not None for p in procs) and not pool.spares


def test_a_spare_that_lost_its_port_gives_way_to_a_fresh_start(pool, tmp_path, monkeypatch):
    """FAULT INJECTION (named): the port handed to the spare is held by a listening socket, as if another
    process had taken it between free_port() and the spare's rendezvous; the session must come up anyway."""
    trainer = MegatronTrainer(seed=1, log_dir=tmp_path / "logs", pool=pool)
    with first_port_taken(monkeypatch) as (taken, handed):
        pool.prestart_sessions(trainer, 1)  # the first port: taken
        spare = next(iter(pool.spares.values()))[0]
        spare_pids = {p.pid for p in spare.procs}
        with trainer.session() as s:
            assert s.procs and all(p.poll() is None for p in s.procs)
            assert {p.pid for p in s.procs}.isdisjoint(spare_pids)
    assert handed[0] == taken and len(handed) >= 2 and not spare.procs


def test_what_spares_are_refused_and_bad_counts(tmp_path):
    pool = TrainerPool(tmp_path)
    assert session_refusal(MegatronTrainer(pool=pool)) is None
    assert session_refusal(MegatronTrainer(pool=pool, transformer_impl="local")) is None
    assert "Ray" in session_refusal(MegatronTrainer(pool=pool, launcher=object()))
    assert "pytest-xdist" in session_refusal(MegatronTrainer(pool=pool, device="cuda",
                                                             gpu_lease=lambda n, owner: None))
    assert pool.prestart_sessions(MegatronTrainer(pool=pool, launcher=object()), 2) == []
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"prestart_sessions\(count=\).*expected an integer >= 0"):
            pool.prestart_sessions(MegatronTrainer(pool=pool), bad)


def test_what_libraries_set_in_the_session_does_not_cost_the_group(pool, tmp_path, monkeypatch):
    """Ray's driver, our Ray cluster and torch's Inductor set variables in the pytest process as a session
    goes on (the suite's Ray checks run between the background start and the first run): the run still
    finds its group. A variable a test sets for the ranks starts another group (negative control)."""
    trainer = MegatronTrainer(seed=3, log_dir=tmp_path / "logs", pool=pool)
    pool.prestart(trainer)
    for name, value in {"RAY_CLIENT_MODE": "0", "PYTHONBREAKPOINT": "ray.util.rpdb._driver_set_trace",
                        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}.items():
        monkeypatch.setenv(name, value)
    assert trainer.train(1).process_run == 1 and len(pool.groups) == 1
    monkeypatch.setenv("MILES_RANKS_READ_THIS", "1")
    assert trainer.train(1).process_run == 1 and len(pool.groups) == 2


def test_a_session_that_fails_on_a_spare_says_why_and_leaves_nothing(pool, tmp_path):
    """A session whose start fails in the spare's ranks (initial weights that are not there): TrainerError
    with the rank's log tail, as on ranks of its own, and the spare's processes gone (never back in the pool)."""
    from pytest_miles.errors import TrainerError

    trainer = MegatronTrainer(seed=1, log_dir=tmp_path / "logs", pool=pool)
    pool.prestart_sessions(trainer, 1)
    spare = next(iter(pool.spares.values()))[0]
    procs = list(spare.procs)
    broken = tmp_path / "broken-hf"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(TrainerError, match=r"megatron rank 0 .*(log .*session-spare-\d+/rank0\.log)"):
        trainer.session(init_hf=broken, hf_config={"vocab_size": 8})
    assert all(p.poll() is not None for p in procs) and not any(pool.spares.values())
