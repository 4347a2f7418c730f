"""SIGTERM and SIGHUP end a pytest-miles session the way Ctrl-C does: teardown runs (engines,
ranks and the Ray head are stopped) and pytest still prints its summary. CI runners send SIGTERM
on a job timeout or a cancelled pipeline; the default action would kill pytest with no teardown.

Ray installs its own SIGTERM handler in `ray.init()` (`sys.exit`, then SIGABRT, no summary):
`ray_init()` blocks the signals while Ray initialises and re-installs ours before they arrive.
Code that swallows the interruption (a library catching KeyboardInterrupt) cannot keep the
session alive: the plugin calls `raise_if_swallowed()` after every test.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

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


def received() -> str | None:
    """The name of the signal that asked this session to stop, if one did."""
    return _received[0] if _received else None


def interruption(exc: BaseException) -> str:
    """The summary line of a session ended by `exc` (a KeyboardInterrupt): which signal stopped it."""
    name = received() or "SIGINT (Ctrl-C)"  # Ray re-raises our Terminated as a plain KeyboardInterrupt
    return (f"pytest-miles: session interrupted by {name} (exit code 2); the engines, trainer ranks and Ray "
            "cluster it started were torn down")


_reraised: list[bool] = []


def raise_if_swallowed() -> None:
    """After a test: a stop signal whose interruption something caught ends the session now
    (pytest: exit code 2, summary printed), once."""
    if _received and not _reraised:
        _reraised.append(True)
        raise Terminated(f"pytest-miles: {_received[0]} received (the running test caught the interruption); "
                         "ending the session")


def ray_init(init: Callable[..., Any], /, **kwargs: Any) -> Any:
    """`ray.init(**kwargs)` with SIGTERM/SIGHUP/SIGINT held back until our handlers are back: a
    signal during Ray's start-up is delivered to us, not to the handler Ray installs. (Letting it
    through instead is worse: once Ray's core worker is up, a SIGTERM during the rest of `ray.init`
    reaches a handler Ray's native code installed: exit by SIGABRT, no summary; measured.)"""
    if threading.current_thread() is not threading.main_thread():
        return init(**kwargs)
    held = {*SIGNALS, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        return init(**kwargs)
    finally:
        _reinstall()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _reinstall() -> None:
    """Our handlers again, at the OS level too: Ray's native code may have replaced the process's
    handler while Python still reports ours (then `ensure()` alone would keep Ray's)."""
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is _handler or current in (signal.SIG_DFL, None) or \
                getattr(current, "__module__", "").startswith("ray"):
            signal.signal(sig, _handler)
    current = signal.getsignal(signal.SIGINT)
    if current is signal.default_int_handler or getattr(current, "__module__", "").startswith("ray"):
        signal.signal(signal.SIGINT, signal.default_int_handler)
