"""Validation at the edge: every value a user hands pytest-miles is checked where it enters.

Options, ini keys, environment variables and config-file entries (`check_setting`), arguments
(`check_train_args`; engines' and trainers' in `EngineSpec` and `TrainerConfig`, with these
helpers), markers and public helpers (`check_*`) fail with one message that names the offending
thing, where it came from and what is accepted -- before any process starts, never as a
traceback from deep code many seconds later.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_miles.errors import InputError

MAX_TOKEN_ID = 2**31 - 1


def _fail(what: str, value: Any, accepted: str) -> InputError:
    return InputError(f"{what}: {value!r} is not accepted; expected {accepted}")


def integer(what: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool, not a float) within [minimum, maximum]."""
    rng = (f" >= {minimum}" if minimum is not None else "") + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(what, value, f"an integer{rng}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(what, value, f"an integer{rng}")
    return value


def token_ids(what: str, value: Any, *, maximum: int = MAX_TOKEN_ID) -> list[int]:
    """A non-empty list (or tuple) of token ids: integers in [0, maximum]."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= maximum for t in value):
        raise _fail(what, _short(value), f"a non-empty list of token ids (integers in [0, {maximum}])")
    return list(value)


def top_k_of(req: dict, field: str) -> int:
    """A request's number of top logprobs per position (SGLang's top_logprobs_num, OpenAI's logprobs and
    top_logprobs): absent or null is none; else an integer >= 0."""
    value = req.get(field)
    return 0 if value is None else integer(field, value, minimum=0, maximum=MAX_TOKEN_ID)


def _short(value: Any) -> Any:
    return value if len(repr(value)) <= 80 else f"{repr(value)[:77]}..."


def number(what: str, value: Any, *, positive: bool = True, allow_zero: bool = False) -> float:
    """A finite real number (> 0, or >= 0 with allow_zero): NaN would disable a check, inf a bound."""
    accepted = "a finite number" + (" >= 0" if allow_zero else " > 0" if positive else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(what, value, accepted)
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise _fail(what, value, accepted)
    return float(value)


def boolean(what: str, value: Any) -> bool:
    """A real bool: `deterministic="no"` is truthy and must not start a deterministic engine."""
    if not isinstance(value, bool):
        raise _fail(what, value, "True or False")
    return value


def choice(what: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise _fail(what, value, "one of " + ", ".join(choices))
    return value


def strings(what: str, value: Any) -> tuple[str, ...]:
    """A list/tuple of strings (a bare string would be split into characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or \
            not all(isinstance(v, str) for v in value):
        raise _fail(what, value, "a list of strings, e.g. ['--sglang-mem-fraction-static', '0.5']")
    return tuple(value)


def path_like(what: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise _fail(what, value, "a path (str or pathlib.Path)")
    if "\x00" in str(value):  # no file system takes one; os.stat would raise a bare ValueError
        raise _fail(what, value, "a path without NUL characters")
    return Path(value)


def writable_file(what: str, value: Any) -> Path:
    """A path to write a file at: its parent folders are created; a folder or an unwritable
    parent is an error now (not an INTERNALERROR after the first test)."""
    path = path_like(what, value)
    if path.is_dir():
        raise InputError(f"{what}: {str(path)!r} is a folder; expected a file path, e.g. {str(path / 'report.json')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what}: cannot create the folder {str(path.parent)!r} ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{what}: {str(path)!r} is not writable")
    return path


def folder(what: str, value: Any) -> Path:
    """A folder that may not exist yet, but is not a file."""
    path = path_like(what, value)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what}: {str(path)!r} is a file; expected a folder")
    return path


# ---- settings: options, ini keys, environment variables, config files --------------------------

_BACKEND = re.compile(r"^[a-z][a-z0-9_]*$")


def _sglang_args(what: str, text: str) -> str:
    try:
        shlex.split(text)
    except ValueError as exc:
        raise InputError(f"{what}: {text!r} cannot be split into arguments ({exc}); quote as in a shell") from None
    return text


def _ray_address(what: str, text: str) -> str:
    if text == "auto":
        return text
    host, sep, port = text.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _fail(what, text, "host:port of the Ray GCS (port 1..65535) or 'auto'")
    return text


def model_folder(what: str, text: str) -> str:
    """An HF model folder: config.json in it."""
    if not (Path(text) / "config.json").is_file():
        raise InputError(f"{what}: {text!r} is not a model folder (HF layout with config.json)")
    return text


def backend_name(what: str, value: Any) -> str:
    """An SGLang attention backend name: checked by its shape, since SGLang adds backends."""
    if not isinstance(value, str) or not _BACKEND.match(value):
        raise _fail(what, value, "an SGLang attention backend name (flashinfer, fa3, triton, fa4, ...)")
    return value


# Bounds that keep a typo from reaching deep code (a count of 10**23 trials, a week-long timeout).
MAX_COUNT = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0


def _seconds(what: str, value: Any, allow_zero: bool = False) -> float:
    seconds = number(what, value, allow_zero=allow_zero)
    if seconds > MAX_SECONDS:
        raise _fail(what, value, f"a number of seconds <= {MAX_SECONDS:g} (7 days)")
    return seconds


def _file(what: str, value: Any) -> str:
    """An existing regular file (a FIFO, device or folder is named as such: reading it would hang or fail)."""
    import stat as _stat

    path = path_like(what, value)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what}: {str(path)!r}: no such file; expected a path to an existing file") from None
    except OSError as exc:
        raise InputError(f"{what}: {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if not _stat.S_ISREG(mode):
        from pytest_miles._files import _what

        raise InputError(f"{what}: {str(path)!r} is {_what(mode)}; expected a regular file")
    return str(path)


# name -> check(what, value); values arrive parsed to the setting's kind.
SETTING_CHECKS: dict[str, Any] = {
    "trials": lambda w, v: integer(w, v, minimum=1, maximum=MAX_COUNT),
    "tensor_parallel": lambda w, v: integer(w, v, minimum=1, maximum=1024),
    "train_steps": lambda w, v: integer(w, v, minimum=1, maximum=MAX_COUNT),
    "engine_timeout": _seconds,
    "engine_request_timeout": _seconds,
    "ray_timeout": _seconds,
    "gpu_lease_timeout": lambda w, v: _seconds(w, v, allow_zero=True),
    "sglang_args": _sglang_args,
    "ray_address": _ray_address,
    "model": model_folder,
    "config": _file,
    "capabilities": _file,
    "report": lambda w, v: str(writable_file(w, v)),
    "report_html": lambda w, v: str(writable_file(w, v)),
    "report_dir": lambda w, v: str(folder(w, v)),
    "snapshot_dir": lambda w, v: str(folder(w, v)),
    "gpu_lease_dir": lambda w, v: str(folder(w, v)),
    "kernel_cache_dir": lambda w, v: str(folder(w, v)),
    "attention_backend": backend_name,
}


def check_setting(name: str, value: Any, source: str) -> Any:
    """The parsed value of setting `name` from `source` (`option --miles-trials`), checked."""
    check = SETTING_CHECKS.get(name)
    if check is None or value is None or value == "":
        return value
    result = check(source, value)
    return value if result is None else result


# ---- fixture arguments ---------------------------------------------------------------------------


def check_train_args(steps: Any, *, save_dir: Any, save_steps: Any, load_dir: Any) -> None:
    """trainer.train(steps, save_dir=, save_steps=, load_dir=)."""
    integer("train(steps)", steps, minimum=1)
    if save_dir is not None:
        path_like("train(save_dir=)", save_dir)
    if load_dir is not None:
        path_like("train(load_dir=)", load_dir)
    if save_steps is not None:
        if isinstance(save_steps, (str, bytes)) or not isinstance(save_steps, (list, tuple)):
            raise _fail("train(save_steps=)", save_steps, f"a list of steps within 1..{steps}")
        for s in save_steps:
            integer("train(save_steps=) entry", s, minimum=1, maximum=steps)
        if save_steps and save_dir is None:
            raise InputError(f"train(save_steps={list(save_steps)}): no save_dir given, so nothing would be saved")


# ---- markers and public helpers ------------------------------------------------------------------


def check_gpu_count_marker(mark: Any) -> int:
    """@pytest.mark.ray_gpus(n): n an integer >= 1 (default 1)."""
    if not mark.args:
        return 1
    return integer(f"@pytest.mark.{mark.name}(n)", mark.args[0], minimum=1)


def check_engine(what: str, engine: Any) -> None:
    if not callable(getattr(engine, "generate", None)):
        raise TypeError(f"{what}: {engine!r} is not an engine (expected an object with generate(), e.g. the "
                        "`engine` or `sglang_engine` fixture)")


def check_run(what: str, run: Any) -> None:
    if not all(hasattr(run, a) for a in ("losses", "grad_norms", "first_step", "checkpoints")):
        raise TypeError(f"{what}: {run!r} is not a training run (expected what trainer.train() returns)")


def check_record_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "::" in name:
        raise _fail("determinism_snapshot.check(name)", name, "a non-empty string without '::'")
    return name
