"""`compare` of two plain DCP checkpoints that are equal, at the speed of reading their bytes.

Why: comparing two checkpoints of 20,000 small tensors must cost less than hashing them (the target:
5x faster than `md5sum`). CPython's own unpickler alone needs ~60 ms for such a `.metadata`, and
a Python index of its entries as much again, per side; that is the whole budget. So, for the
common case (two plain DCP dirs, equal):
- the native reader `_dcpscan` (C, pytest_miles/ckpt/dcpscan/, loaded by ckpt/native.py; module.c's header says how it
  works and why it is safe on hostile files) reads each `.metadata` without building a Python
  object per entry or calling anything, makes every check dcp_layout.py makes, and returns its
  *plan*: one canonical byte string of every item's name, dtype, shape, chunk, file, offsets and
  encoding, and of the compared metadata fields;
- the second side's `.metadata`, when it is the first's but for the save ids (dcp_mirror.py: what
  DCP writes for the same state), is not read again; otherwise it is scanned too;
- meanwhile a thread compares the data files whole (pread and memcmp, the GIL released);
- equal plans + byte-identical data files (long enough for their items) = every item's bytes equal
  = EQUAL, reported as the full path reports it (same counts, same notes; tests compare the two).

Anything else returns None and the caller takes the full Python path, the reference: a dir holding
more than `.metadata` and `*.distcp` files, a data file `.metadata` does not name, a `.metadata` the
native reader does not vouch for (malformed, hostile, merely unusual), plans or bytes that differ,
or no native reader (built at install where a C compiler is found). It never says DIFFERENT and
never raises: it only shortens the way to an EQUAL that the full path gives.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

from pytest_miles._files import SafeFile, read_bytes
from pytest_miles.checks.compare_report import Report, merge_notes
from pytest_miles.ckpt.dcp_mirror import id_notes, mirrored_ids
from pytest_miles.ckpt.native import native_reader
from pytest_miles.errors import CheckpointError

__all__ = ["fast_equal", "native_reader"]

PIECE = 32 * 2**20  # the data threads take the files in pieces of this size


def _ids(scan: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("save_id", "checkpoint_id"):
        value = scan[key]
        if isinstance(value, tuple):  # a PosixPath's parts, as the full path's reader joins them
            value = os.path.join(*value) if value else ""
        if value:
            out[key] = value
    return out


def _plain_dcp_dir(path: str | os.PathLike) -> tuple[Path, list[str]] | None:
    """(the dir, its `.distcp` names) for a dir of only `.metadata` and `*.distcp` regular files."""
    try:
        root = Path(path).resolve(strict=True)
        if not root.is_dir():
            return None
        names, meta = [], False
        with os.scandir(root) as entries:
            for e in entries:
                if not e.is_file():  # a dir, FIFO, socket, device, dangling link: the full path's
                    return None
                if e.name == ".metadata":
                    meta = True
                elif e.name.endswith(".distcp"):
                    names.append(e.name)
                else:
                    return None
    except (OSError, RuntimeError):
        return None
    return (root, sorted(names)) if meta else None


class _WholeFiles:
    """Byte-identical data files? Pieces of every file pair, taken by a thread while `.metadata` is
    read, then by the caller too; stops at the first piece that differs or on `cancel`."""

    def __init__(self, native: Any, pairs: list[tuple[SafeFile, SafeFile]]) -> None:
        self.native, self.stop, self.differ = native, threading.Event(), False
        self.pieces = [(fa.fd, fb.fd, off, min(PIECE, fa.size - off)) for fa, fb in pairs
                       for off in range(0, fa.size, PIECE)]
        self.next = itertools.count().__next__  # atomic under the GIL
        self.threads: list[threading.Thread] = []

    def _work(self) -> None:
        while not self.stop.is_set():
            i = self.next()
            if i >= len(self.pieces):
                return
            try:
                same = self.native.cmp_range(*self.pieces[i]) == -1
            except OSError:
                same = False
            if not same:
                self.differ = True
                self.stop.set()

    def start(self, threads: int) -> None:
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def cancel(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def equal(self) -> bool:
        self._work()
        for t in self.threads:
            t.join()
        return not self.differ


def fast_equal(a: str | os.PathLike, b: str | os.PathLike, workers: int | None = None) -> Report | None:
    """The report of an EQUAL pair of plain DCP checkpoints, or None (take the full path)."""
    native = native_reader()
    if native is None:
        return None
    t0 = time.perf_counter()
    side_a, side_b = _plain_dcp_dir(a), _plain_dcp_dir(b)
    if side_a is None or side_b is None or side_a[1] != side_b[1]:
        return None
    (root_a, names), (root_b, _) = side_a, side_b
    opened: list[SafeFile] = []
    data: _WholeFiles | None = None
    try:
        pairs = []
        for name in names:
            fa = SafeFile(root_a / name)
            opened.append(fa)
            fb = SafeFile(root_b / name)
            opened.append(fb)
            if fa.size != fb.size:
                return None
            pairs.append((fa, fb))
        data = _WholeFiles(native, pairs)
        data.start(1 if (workers or min(2, os.cpu_count() or 1)) > 1 else 0)
        raw_a = read_bytes(root_a / ".metadata", what="DCP metadata")
        sa = native.scan(raw_a)
        if sa is None:
            return None
        ids_a = _ids(sa)
        raw_b = read_bytes(root_b / ".metadata", what="DCP metadata")
        ids_b = mirrored_ids(raw_a, raw_b, ids_a)  # B is A but its ids: A's reading is B's
        del raw_a
        if ids_b is None:
            sb = native.scan(raw_b)
            if sb is None or sb["plan"] != sa["plan"]:
                return None
            ids_b = _ids(sb)
        sizes = {name: fa.size for name, (fa, _) in zip(names, pairs)}
        if (not sa["items"] or sorted(name for name, _ in sa["files"]) != names
                or any(sizes[name] < end for name, end in sa["files"])):
            return None
        if not data.equal():
            return None
    except CheckpointError:
        return None
    finally:
        if data is not None:
            data.cancel()  # no thread reads a descriptor closed below
        for f in opened:
            f.close()
        native.release()  # the scan's memory, kept between the two sides' scans
    return Report(str(a), str(b), "dcp", "dcp", tensors_compared=sa["items"], bytes_compared=2 * sa["nbytes"],
                  seconds=time.perf_counter() - t0, notes=merge_notes(id_notes(ids_a), id_notes(ids_b)))
