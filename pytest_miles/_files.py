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


def file_size(path: str | os.PathLike) -> int:
    with SafeFile(path) as f:
        return f.size


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new
    file, never half of one (a run stopped by a CI timeout included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def aligned_buffer(size: int) -> memoryview:
    """A writable buffer that starts on a page boundary (an anonymous mapping). Why: the kernel's copy
    into a buffer 16 bytes past a page boundary (where malloc puts a large bytearray) is several
    times slower on some CPUs (3.9-5.4x measured on an AMD EPYC): most of a big read's CPU time."""
    import mmap

    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]
