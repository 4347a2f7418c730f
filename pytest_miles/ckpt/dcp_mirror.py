"""Is one DCP `.metadata` another's with only the save's ids changed? Then it need not be read again.

Why: DCP writes the same `.metadata` for the same state, byte for byte, but for the save's ids (a
random `save_id`, a path-dependent `checkpoint_id`), which come last. When the second side's bytes
are the first side's up to that tail and the tail differs only in those strings, its objects are
the first side's with other ids: both the Python reader (dcp_layout.py) and the native fast path
(dcp_fast.py) then take the first side's reading for the second. Anything else (other lengths,
other bytes, other opcodes) returns None and the second side is read in full: the verdict never
depends on this.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["IDS_IGNORED", "id_notes", "mirrored_ids", "mirrored_ids_files"]

IDS_IGNORED = ".metadata: save_id and checkpoint_id are ignored (random per save / path-dependent)"
_TAIL = b"\x8c\x0cstorage_meta\x94"  # protocol 4: the key of Metadata.storage_meta, then its value
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_TAIL_MAX = 65536  # the tail (storage_meta and the ids) is ~200 bytes; more is not what DCP writes
_PIECE = 2**20


def id_notes(ids: dict[str, Any]) -> list[str]:
    """The notes a DCP side carries about its save ids (which are never compared)."""
    notes = [IDS_IGNORED]
    if ids:
        notes.append(f".metadata: {'; '.join(f'{k}={v!s}' for k, v in ids.items())}")
    return notes


def _tail_ops(tail: bytes) -> list[tuple[str, Any]] | None:
    """The opcodes of a pickle's tail (starting at an opcode boundary): [(name, arg)]."""
    import pickletools

    try:
        return [(op.name, arg) for op, arg, _ in pickletools.genops(tail)]
    except Exception:
        return None


def mirrored_ids(raw_a: bytes, raw_b: bytes, ids_a: dict[str, str]) -> dict[str, str] | None:
    """B's save ids when B's `.metadata` is A's with only those changed, else None (full parse).

    Exact for what DCP writes: everything before Metadata's `storage_meta` key (the tensors, the
    storage index, planner data: all but ~200 bytes) must be byte-identical; the tail from that key
    on is disassembled on both sides and must be the same opcodes with the same arguments, except
    string arguments that are A's save_id (a same-length string on B) or the parts of a PosixPath
    (the checkpoint_id: between the `pathlib PosixPath` global and its REDUCE)."""
    if len(raw_a) != len(raw_b) or raw_a.count(_TAIL) != 1:
        return None
    start = raw_a.find(_TAIL)
    if (len(raw_a) - start > _TAIL_MAX or raw_b.find(_TAIL) != start
            or not raw_a.startswith(memoryview(raw_b)[:start])):  # the prefixes, compared without copying them
        return None
    return _tail_ids(raw_a[start:], raw_b[start:], ids_a)


def mirrored_ids_files(fa: Any, fb: Any, ids_a: dict[str, str],
                       same_prefix: Callable[[int], bool]) -> dict[str, str] | None:
    """mirrored_ids of two open `.metadata` files (`_files.SafeFile`), same rules, same answers,
    without either file whole in memory: A is searched for the key in pieces of 1 MiB, the prefixes
    are compared by `same_prefix(n)` (are the first n bytes of both files equal? the native reader's
    `first_diff`, the GIL released), and only the tails (at most 64 KiB) are read into Python.

    B's key at A's key's offset is B's first: both prefixes are equal and A holds the key once, so an
    earlier key on B (inside the prefix or across its end) would be one on A too."""
    size = fa.size
    if fb.size != size:
        return None
    start, found, keep = -1, 0, len(_TAIL) - 1
    for at in range(0, size, _PIECE):  # a key starting in [at, at + _PIECE) lies whole in this piece
        piece = fa.pread(at, min(_PIECE + keep, size - at), "DCP metadata")
        n = piece.count(_TAIL)  # the key cannot overlap itself (one 0x8c byte): no key is missed
        if n:
            found += n
            start = at + piece.find(_TAIL)
        if found > 1:
            return None
    if found != 1 or size - start > _TAIL_MAX:
        return None
    tail_a, tail_b = fa.pread(start, size - start, "DCP metadata"), fb.pread(start, size - start, "DCP metadata")
    if not tail_b.startswith(_TAIL) or not same_prefix(start):
        return None
    return _tail_ids(tail_a, tail_b, ids_a)


def _tail_ids(tail_a: bytes, tail_b: bytes, ids_a: dict[str, str]) -> dict[str, str] | None:
    """B's ids from the two tails (from the `storage_meta` key on), when they differ only in them."""
    ops_a, ops_b = _tail_ops(tail_a), _tail_ops(tail_b)
    if ops_a is None or ops_b is None or len(ops_a) != len(ops_b):
        return None
    save_id, ckpt = ids_a.get("save_id"), ids_a.get("checkpoint_id")
    out: dict[str, str] = {}
    parts_a: list[str] = []
    parts_b: list[str] = []
    in_path, path_seen, last = False, False, ["", ""]
    for (na, xa), (nb, xb) in zip(ops_a, ops_b):
        if na != nb:
            return None
        if na == "STACK_GLOBAL" and last == ["pathlib", "PosixPath"] and ckpt and not (in_path or path_seen):
            in_path = True
            continue
        if na in _STRINGS and not in_path:
            last = [last[1], xa]
        if in_path and na == "REDUCE":  # the first PosixPath of the tail: A's must be the checkpoint_id
            in_path, path_seen = False, True
            if os.path.join(*parts_a) != ckpt:
                return None
            out["checkpoint_id"] = os.path.join(*parts_b)
            continue
        if in_path and na in _STRINGS:
            parts_a.append(xa)
            parts_b.append(xb)
            continue
        if xa == xb:
            continue
        if na not in _STRINGS:
            return None
        if save_id and xa == save_id and len(xb) == len(xa) and "save_id" not in out:
            out["save_id"] = xb
        elif ckpt and xa == ckpt and not path_seen and "checkpoint_id" not in out:
            out["checkpoint_id"] = xb
        else:
            return None
    return {k: out.get(k, v) for k, v in ids_a.items()}
