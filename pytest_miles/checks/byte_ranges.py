"""Stored bytes compared as streams: the items of one (file A, file B) pair in file order, items
adjacent on both sides read as one run into two reused buffers, so that memory stays near a few
buffers, not the checkpoint; bytes equal means values equal (for items of equal encoding).
"""

from __future__ import annotations

import threading
from pathlib import Path

from pytest_miles._files import SafeFile
from pytest_miles.ckpt.model import CheckpointError, Item

__all__ = ["CHUNK", "compare_group", "split"]

CHUNK = 2 * 2**20  # two of these per worker: stays in cache, measured faster than 8 MiB


def _first_diff(fa: SafeFile, fb: SafeFile, oa: int, ob: int, length: int, bufs: tuple[bytearray, bytearray],
                stop: threading.Event) -> int | None:
    """Offset (from oa/ob) of the first CHUNK-aligned block that differs, None when all equal.
    Stops (returning None) as soon as `stop` is set by another worker under --first."""
    ba, bb = bufs
    pos = 0
    while pos < length:
        if stop.is_set():
            return None
        n = min(length - pos, CHUNK)
        va, vb = memoryview(ba)[:n], memoryview(bb)[:n]
        ra, rb = fa.preadinto(va, oa + pos), fb.preadinto(vb, ob + pos)
        if ra != n or rb != n:
            raise CheckpointError(f"{fa.path if ra != n else fb.path}: truncated (file shrank while reading)")
        if (ba != bb) if n == CHUNK else (ba[:n] != bb[:n]):  # bytearray ==: memcmp; memoryview ==: per element
            return pos
        pos += n
    return None


def compare_group(pairs: list[tuple[Item, Item]], files: tuple[Path, Path], stop: threading.Event,
                   first: bool = False) -> tuple[int, int, list[tuple[Item, Item]]]:
    """Compare the byte ranges of items that live in one (file A, file B) pair, in file order.
    Items adjacent on both sides are one run: one read loop for thousands of small tensors.
    Returns (items compared, bytes compared on both sides, the pairs whose bytes differ)."""
    out: list[tuple[Item, Item]] = []
    count = nbytes = 0
    bufs = (bytearray(CHUNK), bytearray(CHUNK))
    with SafeFile(files[0]) as fa, SafeFile(files[1]) as fb:
        i, n = 0, len(pairs)
        while i < n and not stop.is_set():
            a, b = pairs[i]
            if a.length != b.length:
                out.append((a, b))
                count, nbytes, i = count + 1, nbytes + a.length + b.length, i + 1
                if first:
                    stop.set()
                continue
            j, end_a, end_b = i + 1, a.offset + a.length, b.offset + b.length
            while j < n:
                na, nb = pairs[j]
                if na.offset != end_a or nb.offset != end_b or na.length != nb.length:
                    break
                end_a, end_b = end_a + na.length, end_b + nb.length
                j += 1
            pos = _first_diff(fa, fb, a.offset, b.offset, end_a - a.offset, bufs, stop)
            if pos is None:
                if not stop.is_set():
                    count, nbytes = count + j - i, nbytes + 2 * (end_a - a.offset)
                i = j
                continue
            at = a.offset + pos  # items ending before the differing block are equal
            while i < j and pairs[i][0].offset + pairs[i][0].length <= at:
                count, nbytes, i = count + 1, nbytes + 2 * pairs[i][0].length, i + 1
            x, y = pairs[i]  # the item holding the differing block
            same = _first_diff(fa, fb, x.offset, y.offset, x.length, bufs, threading.Event()) is None
            count, nbytes, i = count + 1, nbytes + x.length + y.length, i + 1
            if not same:
                out.append((x, y))
                if first:
                    stop.set()  # --first: nothing after the first differing byte range is read
    return count, nbytes, out


def split(pairs: list[tuple[Item, Item]], parts: int) -> list[list[tuple[Item, Item]]]:
    """One file pair's items (in file order) cut into about `parts` slices of similar byte size,
    so that one big file pair is read by every worker (reads release the GIL), not by one."""
    total = sum(a.length for a, _ in pairs)
    if parts < 2 or total < 4 * CHUNK * parts:
        return [pairs]
    out, cur, acc, step = [], [], 0, total / parts
    for p in pairs:
        cur.append(p)
        acc += p[0].length
        if acc >= step * (len(out) + 1) and len(out) < parts - 1:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out
