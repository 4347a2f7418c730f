"""`compare` of two DCP checkpoints that are equal, at the speed of reading their bytes: plain DCP
dirs and Megatron's torch_dist saves (run dir or `iter_XXXXXXX/`, with `common.pt` and
`metadata.json` beside the `.distcp` files).

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
  = EQUAL, reported as the full path reports it (same counts, same notes; tests compare the two);
- the files beside them (Megatron's `common.pt`, `metadata.json`) must be byte-identical too; a
  torch file is still read (restricted unpickler, small) for the counts the full path reports.

Anything else returns None and the caller takes the full Python path, the reference: a dir holding
more than `.metadata`, `*.distcp`, torch files and json/txt/yaml files, a data file `.metadata` does not
name, a `.metadata` the native reader does not vouch for (malformed, hostile, merely unusual), plans or
bytes that differ, or no native reader (built at install where a C compiler is found). It never says DIFFERENT and
never raises: it only shortens the way to an EQUAL that the full path gives.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

from pytest_miles._files import SafeFile
from pytest_miles.checks.compare_report import Report, merge_notes
from pytest_miles.ckpt.dcp_mirror import id_notes, mirrored_ids_files
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


_TORCH = (".pt", ".pth", ".bin")  # as ckpt/model.py: TORCH_SUFFIXES, SIDE_SUFFIXES
_SIDE = (".json", ".txt", ".yaml", ".yml")
_TRACKER = "latest_checkpointed_iteration.txt"


class _Side:
    """One side as the fast path sees it: the DCP dir, its `.distcp` names, the files beside them,
    its kind and the note the full path adds for a Megatron run dir."""

    def __init__(self, root: Path, distcp: list[str], beside: list[str], kind: str, notes: list[str]) -> None:
        self.root, self.distcp, self.beside, self.kind, self.notes = root, distcp, beside, kind, notes


def _iteration_dir(root: Path) -> Path | None:
    """A Megatron run dir's iteration dir, as its tracker names it (anything unusual: None)."""
    try:
        with SafeFile(root / _TRACKER) as f:  # a regular file (a FIFO is refused, never opened blocking)
            text = f.pread(0, min(f.size, 4096)).decode("ascii").strip()
    except (CheckpointError, UnicodeDecodeError):
        return None
    if not text.isdigit() or len(text) > 7:
        return None
    it = root / f"iter_{int(text):07d}"
    return it if it.is_dir() else None


def _dcp_dir(path: str | os.PathLike) -> _Side | None:
    """The side of a DCP dir holding only `.metadata`, `*.distcp`, torch and side files (all regular),
    or of a Megatron run dir whose tracker names one."""
    try:
        root = Path(path).resolve(strict=True)
        if not root.is_dir():
            return None
        kind, notes = "dcp", []
        if os.path.lexists(root / _TRACKER):
            it = _iteration_dir(root)
            if it is None:
                return None
            kind, notes, root = "megatron/dcp", [f"{root.name}/{_TRACKER} -> {it.name}"], it.resolve(strict=True)
        distcp, beside, meta = [], [], False
        with os.scandir(root) as entries:
            for e in entries:
                if not e.is_file():  # a dir, FIFO, socket, device, dangling link: the full path's
                    return None
                if e.name == ".metadata":
                    meta = True
                elif e.name.endswith(".distcp"):
                    distcp.append(e.name)
                elif e.name.endswith(_TORCH + _SIDE):
                    beside.append(e.name)
                else:
                    return None
    except (OSError, RuntimeError):
        return None
    return _Side(root, sorted(distcp), sorted(beside), kind, notes) if meta else None


def _beside_counts(a: _Side, b: _Side) -> tuple[int, int] | None:
    """(entries, bytes over both sides) the full path counts for the files beside the DCP files,
    when they are byte-identical on both sides (equal bytes: equal values), else None."""
    if a.beside != b.beside:
        return None
    count = nbytes = 0
    for name in a.beside:
        with SafeFile(a.root / name) as fa, SafeFile(b.root / name) as fb:
            if fa.size != fb.size or fa.pread(0, fa.size, name) != fb.pread(0, fb.size, name):
                return None
        if name.endswith(_TORCH):  # the torch reader imported only here (start-up of a plain DCP compare)
            from pytest_miles.ckpt.model import Layout
            from pytest_miles.ckpt.torch_files import add_torch_file

            layout = Layout("torch", a.root)
            add_torch_file(layout, a.root / name, f"{name}:", 0)  # CheckpointError for a bad file: the full path's
            for e in layout.entries.values():
                count += 1
                nbytes += sum(2 * item.length for *_, item in e.chunks)
    return count, nbytes


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
    """The report of an EQUAL pair of DCP checkpoints (plain or Megatron torch_dist), or None (take
    the full path)."""
    native = native_reader()
    if native is None:
        return None
    t0 = time.perf_counter()
    side_a, side_b = _dcp_dir(a), _dcp_dir(b)
    if side_a is None or side_b is None or side_a.distcp != side_b.distcp:
        return None
    opened: list[SafeFile] = []
    data: _WholeFiles | None = None
    try:
        pairs = []
        for name in side_a.distcp:
            fa = SafeFile(side_a.root / name)
            opened.append(fa)
            fb = SafeFile(side_b.root / name)
            opened.append(fb)
            if fa.size != fb.size:
                return None
            pairs.append((fa, fb))
        data = _WholeFiles(native, pairs)
        data.start(1 if (workers or min(2, os.cpu_count() or 1)) > 1 else 0)
        scanned = _plans(native, side_a, side_b, {name: fa.size for name, (fa, _) in zip(side_a.distcp, pairs)})
        beside = _beside_counts(side_a, side_b) if scanned is not None else None
        if scanned is None or beside is None or not data.equal():
            return None
    except CheckpointError:
        return None
    finally:
        if data is not None:
            data.cancel()  # no thread reads a descriptor closed below
        for f in opened:
            f.close()
        native.release()  # the scan's memory, kept between the two sides' scans
    sa, ids_a, ids_b = scanned
    notes = merge_notes(id_notes(ids_a) + side_a.notes, id_notes(ids_b) + side_b.notes)
    return Report(str(a), str(b), side_a.kind, side_b.kind, tensors_compared=sa["items"] + beside[0],
                  bytes_compared=2 * sa["nbytes"] + beside[1], seconds=time.perf_counter() - t0, notes=notes)


def _scan(native: Any, path: Path) -> dict[str, Any] | None:
    """The native scan of one `.metadata` (a regular file, opened as every input is), or None."""
    with SafeFile(path) as f:
        return native.scan_fd(f.fd, f.size)


def _same_prefix(native: Any, fa: SafeFile, fb: SafeFile, n: int) -> bool:
    """The first n bytes of both files equal? (A read error: no, and the full path names it.)"""
    try:
        return native.first_diff(fa.fd, 0, fb.fd, 0, n) == -1
    except OSError:
        return False


def _plans(native: Any, side_a: _Side, side_b: _Side, sizes: dict[str, int]) -> tuple | None:
    """(A's scan, A's ids, B's ids) when both `.metadata` plans are equal and every data file is
    long enough for its items, else None."""
    sa = _scan(native, side_a.root / ".metadata")  # read as it is scanned: never whole beside the scan's graph
    if sa is None:
        return None
    ids_a = _ids(sa)
    with SafeFile(side_a.root / ".metadata") as fa, SafeFile(side_b.root / ".metadata") as fb:
        # B is A but its ids: A's reading is B's (the prefixes compared natively, never whole in Python)
        ids_b = mirrored_ids_files(fa, fb, ids_a, lambda n: _same_prefix(native, fa, fb, n))
    if ids_b is None:
        sb = _scan(native, side_b.root / ".metadata")
        if sb is None or sb["plan"] != sa["plan"]:
            return None
        ids_b = _ids(sb)
    if (not sa["items"] or sorted(name for name, _ in sa["files"]) != side_a.distcp
            or any(sizes[name] < end for name, end in sa["files"])):
        return None
    return sa, ids_a, ids_b
