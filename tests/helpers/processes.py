"""Finding the processes of one pytest session, wherever they were reparented: every process of the
session carries MILES_FAULT_TAG=<tag> in its environment (inherited by whatever it starts)."""

from __future__ import annotations

import psutil

TAG = "MILES_FAULT_TAG"


def tagged(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries this tag."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG) == tag:
                out.append(p)
        except psutil.Error:
            continue
    return out


def listening(pids: set[int] | None = None) -> set[int]:
    """Listening TCP ports (of these processes)."""
    return {c.laddr.port for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and (pids is None or c.pid in pids)}


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return out
