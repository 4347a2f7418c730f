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
    return set(listeners(pids))


def listeners(pids: set[int] | None = None) -> dict[int, set[int | None]]:
    """Listening TCP port -> the pids listening on it (None where the owner cannot be seen)."""
    out: dict[int, set[int | None]] = {}
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and (pids is None or c.pid in pids):
            out.setdefault(c.laddr.port, set()).add(c.pid)
    return out


def still_held(ports: set[int], ours: set[int], tag: str) -> tuple[list[int], list[str]]:
    """Which of a killed session's ports are still held by it: listened on by one of the pids that
    were ours at the kill, by a process carrying our tag, or by an owner that cannot be seen. A port
    the kernel handed to someone else after we let it go (another test, another xdist worker, a
    parallel scenario's Ray) is not a leak; it is returned separately, described, for the record."""
    held, reused = [], []
    for port, pids in sorted(listeners().items()):
        if port not in ports:
            continue
        mine, others = False, []
        for pid in pids:
            if pid is None or pid in ours:
                mine = True
                continue
            try:
                proc = psutil.Process(pid)
                mine = mine or proc.environ().get(TAG) == tag
                others.append(proc)
            except psutil.NoSuchProcess:
                continue
            except psutil.Error:
                mine = True
        if mine:
            held.append(port)
        elif others:
            reused.append(f"{port} (now {'; '.join(describe(others))})")
    return held, reused


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return out
