"""The light hook between the assert_* helpers and the determinism report.

The plugin sets a "current recorder" for each test's call phase; `@recorded(...)` helpers record into
it and read unset arguments from the settings. Outside pytest every function here is a no-op, so the
helper modules import no pytest. See docs/report.md."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MESSAGE_LINES = 40  # failure messages shown by pytest are capped to this many lines


@dataclass
class Recorder:
    """What the plugin offers a test: where records go, the settings, a progress line."""

    record: Callable[[str, str, dict[str, Any], float], None]
    setting: Callable[[str], Any] = lambda name: None
    progress: Callable[[str], Callable[[int, int], None] | None] = lambda check: None
    report_path: str | None = None


CURRENT: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("pytest_miles_recorder", default=None)


def current() -> Recorder | None:
    return CURRENT.get()


def record(check: str, outcome: str, figures: dict[str, Any] | None = None, duration: float = 0.0) -> None:
    """Put a line in the determinism report of the running test; nothing outside pytest."""
    rec = CURRENT.get()
    if rec is not None:
        rec.record(check, outcome, dict(figures or {}), duration)


def setting(name: str, default: Any) -> Any:
    """The session's value of a pytest-miles setting inside a test, else `default`."""
    rec = CURRENT.get()
    value = rec.setting(name) if rec is not None else None
    return default if value is None else value


def progress_callback(check: str) -> Callable[[int, int], None] | None:
    """A progress line for a long check run by hand (not through an assert_* helper)."""
    rec = CURRENT.get()
    return rec.progress(check) if rec is not None else None


def cap_message(text: str, where: str | None = None, lines: int = MESSAGE_LINES) -> str:
    """First `lines` lines of a long failure message + how many were left out + where the full text is."""
    parts = text.splitlines()
    if len(parts) <= lines:
        return text
    rec = CURRENT.get()
    where = where or (rec.report_path if rec is not None else None)
    tail = f"... {len(parts) - lines} more lines"
    tail += f"; the full message is in the determinism report {where}" if where else \
        " (pass --miles-report PATH to keep the full message)"
    return "\n".join(parts[:lines] + [tail])


def _figures(result: Any) -> dict[str, Any]:
    """Small scalar figures from a helper's returned report (its to_json(), when it has one)."""
    data = result.to_json() if hasattr(result, "to_json") else None
    if not isinstance(data, dict):
        return {}
    # not the report's own `passed` (the outcome column says it; for a negative control it would be False)
    return {k: v for k, v in data.items() if k != "passed" and (isinstance(v, (int, float, str, bool)) or v is None)}


KIND = "__kind__"  # a figure key the plugin takes as the line's kind (see report.collector.KINDS)


def recorded(check: str, settings: dict[str, str] | None = None, progress: bool = False,
             kind: str = "determinism") -> Callable:
    """Decorator for an assert_* helper: inside a pytest test, fill arguments the caller left
    unset from the settings named in `settings` ({argument: setting}), pass a progress callback
    when the helper takes one, and record the outcome (passed, or failed with the first line of
    the message), the figures of its returned report and the duration. The full failure message
    goes to the report; pytest shows it capped."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            rec = CURRENT.get()
            if rec is None:
                return fn(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs).arguments
            for arg, name in (settings or {}).items():
                value = rec.setting(name)
                if arg not in bound and value is not None:
                    kwargs[arg] = value
            mode = bound.get("mode", kwargs.get("mode"))
            label = f"{check} [{mode}]" if isinstance(mode, str) else check
            if (progress or "progress" in sig.parameters) and "progress" not in bound:
                kwargs["progress"] = rec.progress(label)
            t0 = time.perf_counter()
            tag = {} if kind == "determinism" else {KIND: kind}
            try:
                result = fn(*args, **kwargs)
            except AssertionError as exc:
                message = str(exc)
                rec.record(label, "failed", {"message": message, **tag}, time.perf_counter() - t0)
                capped = cap_message(message)
                if capped != message:
                    raise AssertionError(capped) from None
                raise
            except Exception as exc:
                from pytest_miles.errors import (
                    Inconclusive,
                    KnownLimitation,
                    NotApplicable,
                    Unavailable,
                    Unbudgeted,
                )

                if isinstance(exc, KnownLimitation):  # a verdict of the capability data, not a failure
                    outcome, message = "xfailed", str(exc)
                elif isinstance(exc, Unbudgeted):
                    outcome, message = "unbudgeted", str(exc)
                elif isinstance(exc, Inconclusive):
                    outcome, message = "inconclusive", str(exc)
                elif isinstance(exc, (NotApplicable, Unavailable)):
                    outcome, message = "skipped", str(exc)
                else:  # bad input, a crash: the helper could not judge; pytest says failed, so does this
                    outcome, message = "error", f"{type(exc).__name__}: {exc}"
                rec.record(label, outcome, {"message": message, **tag}, time.perf_counter() - t0)
                raise
            rec.record(label, "passed", {**_figures(result), **tag}, time.perf_counter() - t0)
            return result

        return inner

    return wrap


# The stage a long step is in (an engine starting, trainer ranks launching): a timeout that fires
# inside it is reported as a timeout of that stage, and finished stages are the report's per-stage
# times. Plain globals: pytest-timeout's signal and the report both run on the main thread.
_STAGE: list[tuple[str, float]] = []
_FAILED_IN: list[str] = []
_DONE: list[tuple[str, float]] = []


@contextlib.contextmanager
def stage(label: str, hint: str = ""):
    """`with stage("starting sglang", hint=...):` names the stage for a timeout (with `hint`: what to
    do about a slow one) and times it for the report. Off the main thread (an engine starting in the
    background) it does nothing: the stage stack is the main thread's; the test that takes the
    engine records the wait instead (`note_stage`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    t0 = time.monotonic()
    _STAGE.append((label, t0))
    try:
        yield
    except BaseException:
        if not _FAILED_IN:  # the innermost stage is the one that was slow
            _FAILED_IN.append(f"{label}, {time.monotonic() - t0:.0f} s in" + (f" ({hint})" if hint else ""))
        raise
    else:
        _DONE.append((label, round(time.monotonic() - t0, 3)))
    finally:
        _STAGE.pop()


def note_stage(label: str, seconds: float) -> None:
    """A stage that ran elsewhere (an engine started in the background), timed for the report."""
    if threading.current_thread() is threading.main_thread():
        _DONE.append((label, round(seconds, 3)))


def failed_stage() -> str | None:
    """The stage the last exception left (and forget it), for the test's report."""
    return _FAILED_IN.pop() if _FAILED_IN else None


def finished_stages() -> list[tuple[str, float]]:
    """The stages finished since the last call (and forget them), with their seconds."""
    done = list(_DONE)
    _DONE.clear()
    return done
