"""The rendezvous port race: free_port() picks a port, releases it, and rank 0's TCPStore binds it a
moment later; on a busy machine another process can take it in between (seen in CI-like runs: rank 0
"EADDRINUSE" during 'ready'). A lost race is retried on a new port; any other failure is not."""

from __future__ import annotations

import pytest

from pytest_miles.placement.processes import port_race_lost
from tests.helpers.port_race import first_port_taken


def test_a_lost_race_is_told_from_other_failures(tmp_path):
    lost, other = tmp_path / "rank0.log", tmp_path / "rank1.log"
    lost.write_text("torch.distributed.DistNetworkError: ... code: -98, name: EADDRINUSE, message: address already "
                    "in use")
    other.write_text("RuntimeError: CUDA out of memory")
    assert port_race_lost([other, lost]) and not port_race_lost([other]) and not port_race_lost([tmp_path / "none"])


def test_a_session_whose_port_was_taken_starts_on_another(tmp_path, monkeypatch):
    """FAULT INJECTION (named): the first port handed to the ranks is held by a listening socket, as
    if another process had taken it; the session must come up on a new port."""
    pytest.importorskip("megatron.core")
    from pytest_miles.trainers import megatron

    with first_port_taken(monkeypatch) as (taken, handed):
        with megatron.MegatronTrainer(seed=1, log_dir=tmp_path / "logs").session() as session:
            assert session.procs and all(p.poll() is None for p in session.procs)
    assert len(handed) == 2 and handed[0] == taken and handed[1] != taken
