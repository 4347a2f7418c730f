"""The local Ray head's port is free when picked, not necessarily when Ray binds it: a concurrent
session can take it in between. A head whose port answers from somebody else's process is started
again on another port, and never connected to the neighbour."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("ray")

from pytest_miles.placement import ray_cluster  # noqa: E402
from pytest_miles.placement.processes import free_port  # noqa: E402

SQUATTED = """
import socket, sys
from pytest_miles.placement import ray_cluster
from pytest_miles.placement.processes import free_port

squatter = socket.socket()
squatter.bind(("127.0.0.1", 0))
squatter.listen(8)  # a neighbour listening on the port we are about to pick
taken = squatter.getsockname()[1]
picks = iter([taken])
ray_cluster.free_port = lambda: next(picks, None) or free_port()  # FAULT INJECTION: the first pick is taken
cluster = ray_cluster.RayCluster.start_local(sys.argv[1], num_cpus=1)
try:
    assert cluster.address != f"127.0.0.1:{taken}", cluster.address
    assert len(cluster.nodes()) == 1
    print("started on", cluster.address, "not", taken)
finally:
    cluster.shutdown()
    squatter.close()
"""


@pytest.mark.slow
def test_a_port_taken_between_pick_and_bind_is_given_up_for_another(tmp_path):
    """In a process of its own: Ray connects once per process, and a session-scoped cluster of another
    test may hold this worker's connection."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", SQUATTED, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0 and "started on" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


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
