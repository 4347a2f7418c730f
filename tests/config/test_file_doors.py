"""Every input file goes through one door (`pytest_miles._files`): a table of hostile files (a FIFO,
a socket, /dev/zero, a folder, a /proc file, non-UTF-8 bytes, nesting without end, a file over the
size limit) handed to every reader of settings, capability data, snapshots, runtime envs, env-var
JSON and manifests. Each case: one error of ours naming the file and what is accepted, within 2 s,
never a hang (a per-case time limit), never a traceback from a library below.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_miles import _files
from pytest_miles.errors import CheckpointError, MilesError

pytestmark = pytest.mark.timeout(20)


def _config(path: str) -> Any:
    from pytest_miles import config as options

    return options.resolve(None, "trials", environ={"PYTEST_MILES_CONFIG": path})


def _capabilities(path: str) -> Any:
    from pytest_miles.capabilities import read_file

    return read_file(path)


def _snapshot(path: str) -> Any:
    from pytest_miles.snapshots.store import SnapshotStore

    return SnapshotStore(Path(path).parent).read(Path(path))


def _runtime_env(path: str) -> Any:
    from pytest_miles.facts.doctor_env import load_runtime_env

    return load_runtime_env(path)


def _manifest(path: str) -> Any:
    from pytest_miles.checks.manifest_compare import compare_with_manifest
    from pytest_miles.checks.values import Ignore

    return compare_with_manifest(path, path, Ignore(()), 0.0)


def _troubleshooting(path: str) -> Any:
    from pytest_miles.facts.troubleshooting import read_file

    return read_file(path)


READERS: dict[str, tuple[Callable[[str], Any], str]] = {  # name: (reader, format of the deep case)
    "config": (_config, "toml"), "capabilities": (_capabilities, "toml"), "snapshot": (_snapshot, "json"),
    "runtime_env": (_runtime_env, "json"), "manifest": (_manifest, "json"),
    "troubleshooting": (_troubleshooting, "toml"),
}


def _deep(fmt: str, depth: int = 3000) -> str:
    if fmt == "toml":
        return "x = " + "[" * depth + "]" * depth + "\n"
    return "[" * depth + "]" * depth


def _deep_but_parsable(fmt: str) -> str:  # deeper than accepted, within the parser's recursion limit
    if fmt == "toml":
        return "[meta]\nx = " + "[" * 100 + "]" * 100 + "\n"
    return '{"format": ' + "[" * 100 + "]" * 100 + "}"


BAD = {  # kind: (make(tmp_path, fmt) -> path, what the message must say)
    "fifo": (lambda tmp, fmt: _fifo(tmp), "a FIFO"),
    "socket": (lambda tmp, fmt: _socket(tmp), "socket"),
    "dev_zero": (lambda tmp, fmt: "/dev/zero", "/dev"),
    "directory": (lambda tmp, fmt: str(tmp), "a directory"),
    "proc": (lambda tmp, fmt: "/proc/self/status", "/proc"),
    "missing": (lambda tmp, fmt: str(tmp / "nope"), "no such file"),
    "not_utf8": (lambda tmp, fmt: _write(tmp / "bin", b"x = '\xff\xfe\xc3'\n"), "not UTF-8"),
    "deep": (lambda tmp, fmt: _write(tmp / "deep", _deep(fmt).encode()), ""),
    "deep_parsable": (lambda tmp, fmt: _write(tmp / "deep2", _deep_but_parsable(fmt).encode()), "nested deeper"),
    "too_big": (lambda tmp, fmt: _sparse(tmp / "big"), "larger than"),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "fifo")
    return str(tmp / "fifo")


def _sparse(path: Path) -> str:
    with open(path, "wb") as f:
        f.truncate(2**31)  # 2 GiB of holes: no disk used, bigger than any reader accepts
    return str(path)


_SOCKETS: list[socket.socket] = []


def _socket(tmp: Path) -> str:
    path = f"/tmp/miles-door-{os.getpid()}-{len(_SOCKETS)}.sock"  # AF_UNIX paths are short
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    _SOCKETS.append(s)
    return path


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _SOCKETS:
        s = _SOCKETS.pop()
        name = s.getsockname()
        s.close()
        Path(name).unlink(missing_ok=True)


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_every_hostile_file_by_name(tmp_path, reader, kind):
    fn, fmt = READERS[reader]
    make, says = BAD[kind]
    if (reader, kind) == ("snapshot", "missing"):
        pytest.skip("a missing snapshot file is an empty one (documented: the first run records)")
    path = make(tmp_path, fmt)
    t0 = time.monotonic()
    with pytest.raises((MilesError, ValueError)) as info:
        fn(path)
    assert time.monotonic() - t0 < 2, f"{reader} took {time.monotonic() - t0:.1f} s on {kind}"
    msg = str(info.value)
    assert path in msg and says in msg, msg
    assert "Traceback" not in msg and "\n" not in msg
    assert isinstance(info.value, MilesError), type(info.value)
    assert "pytest_miles" in str(info.traceback[-1].path), f"raised from {info.traceback[-1].path}"


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"A": ' * 200 + "1" + "}" * 200, "\ufeff{}", "x" * 100])
def test_train_env_vars_text_is_bounded_and_named(text):
    from pytest_miles.errors import EnvInputError
    from pytest_miles.facts.doctor_env import parse_train_env_vars

    with pytest.raises(EnvInputError, match="^--train-env-vars"):
        parse_train_env_vars(text)


def test_the_door_accepts_what_it_should(tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text('{"a": [1, {"b": 2}]}')
    assert _files.load_json(ok, "a file") == {"a": [1, {"b": 2}]}
    link = tmp_path / "link.json"
    link.symlink_to(ok)  # a symlink to a regular file is a regular file
    assert _files.load_json(link, "a file") == {"a": [1, {"b": 2}]}
    assert _files.parse_json("[" * 64 + "]" * 64, "text") is not None  # the limit itself is accepted


def test_a_manifest_with_wrong_types_inside_is_named(tmp_path):
    from pytest_miles.checks.manifest_compare import _checked
    from pytest_miles.ckpt.manifest import MANIFEST_FORMATS

    fmt = next(iter(MANIFEST_FORMATS))
    for bad, says in [({"entries": {"w": 5}}, "entry 'w'"), ({"entries": {}, "chunks": {"w": "x"}}, "'chunks'"),
                      ({"entries": {}, "chunk_elements": "9"}, "'chunk_elements'"),
                      ({"entries": {}, "chunk_elements": 0}, "'chunk_elements'"),
                      ({"entries": {}, "layers": []}, "'layers'"), ({"entries": []}, "not a pytest-miles"),
                      ({"entries": {}, "kind": 3}, "'kind'")]:
        with pytest.raises(CheckpointError, match=says):
            _checked({"format": fmt, **bad}, "m.json")


CLI = [
    (["capabilities", "--file", "BAD"], "pytest-miles capabilities: "),
    (["doctor", "--runtime-env", "BAD"], "--runtime-env"),
]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "not_utf8", "deep"])
@pytest.mark.parametrize(("argv", "says"), CLI, ids=["capabilities", "doctor"])
def test_cli_exits_2_naming_the_file(tmp_path, capsys, argv, says, kind):
    from pytest_miles.cli import main

    path = BAD[kind][0](tmp_path, "toml" if argv[0] == "capabilities" else "json")
    code = main([path if a == "BAD" else a for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and says in err and path in err and "Traceback" not in err, (code, err)


@pytest.mark.parametrize("kind", ["fifo", "not_utf8", "deep"])
@pytest.mark.parametrize("option", ["--miles-config", "--miles-capabilities"])
def test_pytest_gives_a_usage_error_before_any_test(pytester, option, kind):
    path = BAD[kind][0](pytester.path, "toml")
    pytester.makepyfile("def test_one():\n    raise SystemExit('a test ran')\n")
    result = pytester.runpytest("-p", "no:randomly", f"{option}={path}")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert path in out and "a test ran" not in out and "Traceback" not in out, out


def test_gpu_lease_with_a_string_count_is_named(pytester):
    pytester.makepyfile("""
        import pytest
        from pytest_miles.errors import InputError

        def test_lease(miles_gpu_lease):
            for bad in ("2", 2.0, True, 10**30, -1):
                with pytest.raises(InputError, match=r"miles_gpu_lease\\(n\\)"):
                    miles_gpu_lease(bad)
    """)
    result = pytester.runpytest("-p", "no:randomly")
    assert result.ret == 0, result.stdout.str()
