"""FAULT INJECTION (named): the first rendezvous port `free_port()` hands the megatron-core ranks is held
by a listening socket, as if another process had taken it between the pick and rank 0's TCPStore bind."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def first_port_taken(monkeypatch) -> Iterator[tuple[int, list[int]]]:
    """(the taken port, every port handed out so far) while the first one handed out is taken."""
    from pytest_miles.trainers import megatron

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    handed: list[int] = []
    real = megatron.free_port

    def first_one_taken(host: str = "127.0.0.1") -> int:
        handed.append(taken if not handed else real(host))
        return handed[-1]

    monkeypatch.setattr(megatron, "free_port", first_one_taken)
    try:
        yield taken, handed
    finally:
        squatter.close()
