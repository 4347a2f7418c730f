"""Opening files that come from someone else: regular files only, reads bounded by their size.

Why: a FIFO named like a shard blocks `open()` forever and a device never ends; a checkpoint
tool pointed at other people's files must refuse those by name instead (exit 2), never hang.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pytest_miles.errors import CheckpointError  # noqa: F401  (importable here too)

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _what(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class SafeFile:
    """A read-only regular file: opened with O_NONBLOCK (a FIFO can never block the open), then
    checked with fstat; `size` is fixed at open and every read stays inside it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except PermissionError:
            raise CheckpointError(f"{self.path}: not readable (permission denied)") from None
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{self.path}: symlink loop") from None
            if exc.errno in (errno.ENXIO, errno.EISDIR):  # a socket or a directory
                raise CheckpointError(f"{self.path}: cannot be read ({_what(os.stat(self.path).st_mode)}, "
                                      "only regular files are read)") from None
            raise CheckpointError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CheckpointError(f"{self.path}: cannot be read ({_what(st.st_mode)}, only regular files are read)")
        self.fd, self.size = fd, st.st_size

    def pread(self, offset: int, length: int, what: str = "data") -> bytes:
        """Exactly `length` bytes at `offset`, or a CheckpointError naming the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CheckpointError(f"{self.path}: {what} at bytes [{offset}, {offset + length}) is outside the "
                                  f"file ({self.size} bytes)")
        first = os.pread(self.fd, length, offset) if length else b""
        if len(first) == length:  # the usual case: one read, no copy
            return first
        out = bytearray(first)
        while len(out) < length:
            chunk = os.pread(self.fd, length - len(out), offset + len(out))
            if not chunk:
                raise CheckpointError(f"{self.path}: truncated while reading {what} (file shrank?)")
            out += chunk
        return bytes(out)

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def read_all(self, limit: int = 256 * 2**20, what: str = "file") -> bytes:
        if self.size > limit:
            raise CheckpointError(f"{self.path}: {what} of {self.size} bytes is larger than the {limit} bytes accepted")
        return self.pread(0, self.size, what)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_bytes(path: str | os.PathLike, limit: int = 256 * 2**20, what: str = "file") -> bytes:
    with SafeFile(path) as f:
        return f.read_all(limit, what)


def read_text(path: str | os.PathLike, limit: int = 64 * 2**20, what: str = "file") -> str:
    data = read_bytes(path, limit, what)
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# ---- the door for every other input file: settings, capability data, snapshots, runtime envs ----

INPUT_LIMIT = 16 * 2**20  # a settings, capability, snapshot or env file is small; a bigger one is a mistake
MAX_DEPTH = 64  # nesting of TOML/JSON values: deeper is not a configuration, it is an attack on the parser


_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")  # kernel views: sizes lie (0 bytes or endless), reads can block


def _special(path: str | os.PathLike) -> str | None:
    """The kernel file system a path lies in (/proc, /sys, /dev), by its real name, or None."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return None
    return next((root for root in _SPECIAL_ROOTS if real == root or real.startswith(root + "/")), None)


def read_input(path: str | os.PathLike, what: str, limit: int = INPUT_LIMIT, error: type | None = None) -> str:
    """The UTF-8 text of a small input file, through the same door as checkpoints (regular files
    only, non-blocking open, size bounded before reading, nothing under /proc, /sys or /dev). Errors
    are one InputError (or `error`) naming `what`, the file and what is accepted."""
    from pytest_miles.errors import InputError

    error = error or InputError
    accepted = f"a regular UTF-8 text file of at most {limit} bytes"
    root = _special(path)
    if root is not None:
        raise error(f"{path}: {what}: a file under {root} (a kernel view, not a file to read); "
                    f"expected {accepted}")
    try:
        with SafeFile(path) as f:
            if f.size > limit:
                raise error(f"{path}: {what}: {f.size} bytes, larger than the {limit} bytes accepted")
            data = f.pread(0, f.size, what)
    except CheckpointError as exc:
        problem = str(exc).removeprefix(f"{path}: ")
        raise error(f"{path}: {what}: {problem}; expected {accepted}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                    f"expected {accepted}") from None


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed value, stopping early past `limit` (iterative: no recursion limit)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def load_toml(path: str | os.PathLike, what: str, limit: int = INPUT_LIMIT, error: type | None = None) -> dict:
    """A TOML input file as a dict (see `read_input`); bad TOML or deep nesting named."""
    import tomllib

    from pytest_miles.errors import InputError

    error = error or InputError
    text = read_input(path, what, limit, error)
    try:  # tomllib is pure Python: a deep inline array ends in a clean RecursionError
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise error(f"{path}: {what}: not valid TOML ({str(exc)[:200]})") from None
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise error(f"{path}: {what}: nested deeper than {MAX_DEPTH} levels (TOML of at most "
                    f"{MAX_DEPTH} levels is accepted)")
    return data


def load_json(path: str | os.PathLike, what: str, limit: int = INPUT_LIMIT, error: type | None = None) -> object:
    """A JSON input file (see `read_input`); bad JSON or deep nesting named."""
    text = read_input(path, what, limit, error)
    return parse_json(text, f"{path}: {what}", error)


def parse_json(text: str, what: str, error: type | None = None, limit: int = INPUT_LIMIT) -> object:
    """JSON text from a user (a file's or an option's), bounded in size and nesting before parsing."""
    import json

    from pytest_miles.errors import InputError

    error = error or InputError
    if len(text) > limit:
        raise error(f"{what}: {len(text)} characters, more than the {limit} accepted")
    try:  # the C scanner ends a deep array in a clean RecursionError; the depth is checked after
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON ({str(exc)[:200]})") from None
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise error(f"{what}: nested deeper than {MAX_DEPTH} levels (JSON of at most {MAX_DEPTH} levels "
                    "is accepted)")
    return data


def file_size(path: str | os.PathLike) -> int:
    with SafeFile(path) as f:
        return f.size


def aligned_buffer(size: int) -> memoryview:
    """A writable buffer that starts on a page boundary (an anonymous mapping). Why: the kernel's copy
    into a buffer 16 bytes past a page boundary (where malloc puts a large bytearray) is several
    times slower on some CPUs (3.9-5.4x measured on an AMD EPYC): most of a big read's CPU time."""
    import mmap

    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync'd, then renamed over
    it: readers see the old or the new file, never half of one (a run stopped by a CI timeout or a
    power cut included). The file keeps its mode (a new one gets the umask's); the temporary is
    removed if anything fails. The one atomic write of the package (reports, snapshots, manifests,
    trainer replies and results)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        try:  # keep the file's mode (mkstemp makes 0600)
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


write_atomic = atomic_write  # the earlier name, still imported (ckpt manifests, report.collector)
