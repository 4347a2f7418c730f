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
from typing import Any

__all__ = ["IDS_IGNORED", "id_notes", "mirrored_ids"]

IDS_IGNORED = ".metadata: save_id and checkpoint_id are ignored (random per save / path-dependent)"
_TAIL = b"\x8c\x0cstorage_meta\x94"  # protocol 4: the key of Metadata.storage_meta, then its value
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def id_notes(ids: dict[str, Any]) -> list[str]:
    """The notes a DCP side carries about its save ids (which are never compared)."""
    notes = [IDS_IGNORED]
    if ids:
        notes.append(f".metadata: {'; '.join(f'{k}={v!s}' for k, v in ids.items())}")
    return notes


def _tail_ops(raw: bytes, start: int) -> list[tuple[str, Any]] | None:
    """The opcodes of a pickle's tail (from `start`, an opcode boundary): [(name, arg)]."""
    import pickletools

    try:
        return [(op.name, arg) for op, arg, _ in pickletools.genops(raw[start:])]
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
    if (len(raw_a) - start > 65536 or raw_b.find(_TAIL) != start
            or not raw_a.startswith(memoryview(raw_b)[:start])):  # the prefixes, compared without copying them
        return None
    ops_a, ops_b = _tail_ops(raw_a, start), _tail_ops(raw_b, start)
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
