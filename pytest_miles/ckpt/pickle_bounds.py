"""Bounds on what a pickle can make the reader do: memo indices within the file's size (the C
unpickler allocates its memo table from the largest index), and shared references walked once
(a list holding one list twice, 40 levels deep, is 2^40 leaves when walked as a tree).
"""

from __future__ import annotations

from typing import Any

from pytest_miles.errors import CheckpointError

__all__ = ["MAX_NESTING", "Shared", "check_memo", "unshare"]


def _arg_table() -> dict[int, tuple[int, bool]]:
    """Opcode byte -> (argument size: >= 0 fixed bytes, -1 a line, -2/-3/-4/-5 a length of 1/4/4/8
    bytes then that many bytes; signed length), from pickletools' opcode table."""
    import pickletools

    table = {}
    for op in pickletools.opcodes:
        n = op.arg.n if op.arg is not None else 0
        table[op.code.encode("latin-1")[0]] = (n, n == pickletools.TAKEN_FROM_ARGUMENT4)
    return table


_ARGS: dict[int, tuple[int, bool]] = {}
_WIDTH = {-2: 1, -3: 4, -4: 4, -5: 8}


def check_memo(data: bytes, where: str) -> None:
    """Refuse memo indices larger than the pickle: the C unpickler sizes its memo table from the
    largest index it sees (`LONG_BINPUT 100000000` in a 10-byte file asks for 1.5 GB), while a real
    pickle numbers its memo entries from 0, one per stored object (each takes bytes of the file).
    A skip over the opcodes (arguments are not decoded): ~1 s for a 5 MB pickle on a busy core."""
    if not _ARGS:
        _ARGS.update(_arg_table())
    i, n, args = 0, len(data), _ARGS
    put, long_binput, stop = ord("p"), ord("r"), ord(".")
    two_lines = (ord("c"), ord("i"))  # GLOBAL, INST: module and name lines
    while i < n:
        op = data[i]
        i += 1
        if op == stop or op not in args:
            return  # the end, or garbage the unpickler names
        size, signed = args[op]
        index = -1
        if size >= 0:
            if op == long_binput:
                index = int.from_bytes(data[i:i + 4], "little")
            i += size
        elif size == -1:
            j = data.find(b"\n", i)
            if op in two_lines and j >= 0:
                j = data.find(b"\n", j + 1)
            if j < 0:
                return
            if op == put and data[i:j].isdigit():
                index = int(data[i:j])
            i = j + 1
        else:
            width = _WIDTH[size]
            i += width + int.from_bytes(data[i:i + width], "little", signed=signed)
        if index > n:
            raise CheckpointError(f"{where}: refused: memo index {index} in a pickle of {n} bytes (a real "
                                  "pickle's memo indices stay below its size)")


class Shared:
    """A container met again while walking an unpickled object: the path where it was first met.
    Why: pickles share references (a list holding one list twice, 40 levels deep, is 2^40 leaves
    when walked as a tree); after `unshare` every walk and comparison is linear in the file."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shared) and other.path == self.path

    def __hash__(self) -> int:
        return hash(("Shared", self.path))

    def __repr__(self) -> str:
        return f"<the object at {self.path or '(root)'}>"


MAX_NESTING = 200
_NOTHING = type(None)  # no record type: containers only


def unshare(obj: Any, where: str, record: type = _NOTHING) -> Any:
    """The object with every container met a second time replaced by `Shared(first path)`, so
    that it is a tree (cycles included); nesting deeper than MAX_NESTING levels is refused, named.
    Objects of type `record` (the reader's stand-ins) have their fields walked too."""
    seen: dict[int, str] = {}
    keep: list[Any] = []  # ids stay valid while the walk runs

    def walk(v: Any, path: str, depth: int) -> Any:
        if not isinstance(v, (list, dict, tuple, record)):
            return v
        if id(v) in seen:
            return Shared(seen[id(v)])
        if depth > MAX_NESTING:
            raise CheckpointError(f"{where}: refused: objects nested deeper than {MAX_NESTING} levels at {path[:200]}")
        seen[id(v)] = path
        keep.append(v)
        if isinstance(v, list):
            for i, x in enumerate(v):
                new = walk(x, f"{path}[{i}]", depth + 1)
                if new is not x:
                    v[i] = new
        elif isinstance(v, dict):
            for k, x in list(v.items()):
                new = walk(x, f"{path}.{k}", depth + 1)
                if new is not x:
                    v[k] = new
        elif isinstance(v, tuple):
            items = [walk(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
            if any(a is not b for a, b in zip(items, v)):
                t = type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
                seen[id(t)] = path
                keep.append(t)
                return t
        else:
            for k, x in list(v.__dict__.items()):
                new = walk(x, f"{path}.{k}", depth + 1)
                if new is not x:
                    v.__dict__[k] = new
        return v

    return walk(obj, "", 0)
