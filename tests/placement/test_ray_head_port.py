"""The local Ray head's port is free when picked, not necessarily when Ray binds it: a concurrent
session can take it in between. A head whose port answers from somebody else's process is started
again on another port, and never connected to the neighbour."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("ray")

from pytest_miles.placement import ray_cluster  # noqa: E402
from pytest_miles.placement.processes import free_port  # noqa: E402


@pytest.mark.slow
def test_a_port_taken_between_pick_and_bind_is_given_up_for_another(monkeypatch, tmp_path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(8)  # a neighbour listening on the port we are about to pick
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    monkeypatch.setattr(ray_cluster, "free_port", lambda: next(picks, None) or free_port())
    cluster = ray_cluster.RayCluster.start_local(tmp_path, num_cpus=1)
    try:
        assert cluster.address != f"127.0.0.1:{taken}"
        assert len(cluster.nodes()) == 1
    finally:
        cluster.shutdown()
        squatter.close()


def test_listening_is_read_from_the_process_tree():
    import os

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        assert ray_cluster._listens_in_tree(os.getpid(), port) in (True, None)  # None: not readable here
        assert ray_cluster._listens_in_tree(os.getpid(), free_port()) in (False, None)
    finally:
        s.close()
