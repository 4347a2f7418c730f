"""SIGTERM and SIGHUP end a pytest-miles session the way Ctrl-C does: teardown runs (engines,
ranks and the Ray head are stopped) and pytest still prints its summary. CI runners send SIGTERM
on a job timeout or a cancelled pipeline; the default action would kill pytest with no teardown.

Ray's `ray.init()` installs its own SIGTERM handler (`sys.exit(15)`), under which a terminated
session ends with SIGABRT and no summary; `ensure()` puts ours back after every `ray.init()`.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The session was asked to stop by a signal: pytest treats it as an interruption."""


_received: list[str] = []


def _handler(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _received:  # a second signal while tearing down: let the teardown finish
        return
    _received.append(name)
    raise Terminated(f"pytest-miles: {name} received; tearing down the engines, ranks and clusters it started")


def ensure() -> None:
    """Install (or re-install, after Ray replaced them) the handlers; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is _handler:
            continue
        if current in (signal.SIG_DFL, None) or getattr(current, "__module__", "").startswith("ray"):
            signal.signal(sig, _handler)
