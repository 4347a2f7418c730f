"""What a checkpoint holds, whatever its format: named entries (tensors as chunks = byte ranges in
files, DCP byte items, plain values), the layout that lists them, and the small helpers every
format reader shares (dtype sizes, safe directory listing, flattening of nested containers).

Why a module of its own: the format readers (dcp_layout, torch_files, safetensors, ...) and the
comparison in checks/ all build or read these types; they live below all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.errors import CheckpointError

__all__ = ["ITEMSIZE", "CheckpointEntry", "CheckpointError", "Item", "Layout", "flatten", "listdir", "numel",
           "resolve_path"]

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "complex32": 4,
            "complex64": 8, "complex128": 16, "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1}
ITER_RE = re.compile(r"iter_(\d{7})$")
MP_RANK_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
SIDE_SUFFIXES = (".json", ".txt", ".yaml", ".yml")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(slots=True)
class Item:
    """Bytes [offset, offset+length) of file: one tensor chunk, one DCP byte item, ..."""

    key: str
    file: Path
    offset: int
    length: int
    order: int
    kind: str = "tensor"  # tensor | bytes
    encoding: Any = "raw"  # equal bytes mean equal values only between items of equal encoding
    decode: Callable[[], Any] | None = None


@dataclass(slots=True)
class CheckpointEntry:
    """One named thing of a checkpoint: a tensor (global dtype/shape, stored as chunks), a DCP byte
    item, or a value."""

    name: str
    order: int
    kind: str  # tensor | bytes | value
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    chunks: list[tuple[tuple[int, ...], tuple[int, ...], Item]] = field(default_factory=list)
    value: Any = None
    where: str = ""

    def geometry(self) -> list[tuple[tuple[int, ...], tuple[int, ...], Any]]:
        return [(o, s, it.encoding) for o, s, it in self.chunks]

    def assemble(self):
        """The whole tensor (only where values are needed: layouts differ, or bytes differ)."""
        import torch

        if len(self.chunks) == 1 and tuple(self.chunks[0][1]) == tuple(self.shape or ()):
            return self.chunks[0][2].decode().reshape(self.shape or ())
        out = torch.zeros(self.shape or (), dtype=getattr(torch, self.dtype or "float32"))
        for offsets, sizes, item in self.chunks:
            part = item.decode()
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = part.reshape(sizes)
        return out


@dataclass
class Layout:
    """Everything one checkpoint holds, by name, and how it is stored."""

    kind: str
    root: Path
    entries: dict[str, CheckpointEntry] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # compared semantically
    side_files: dict[str, Path] = field(default_factory=dict)  # json/txt next to the tensors
    notes: list[str] = field(default_factory=list)
    layout_info: dict[str, Any] = field(default_factory=dict)  # how it is stored: reported, not compared
    # entries shared with the other side's layout (same entry objects: its `.metadata` mirrors this
    # one's, see dcp_layout): their items are read from these files instead
    relocate: dict[Path, Path] = field(default_factory=dict)

    def add(self, entry: CheckpointEntry, source: Path) -> None:
        if entry.name in self.entries:
            raise CheckpointError(f"{source}: {entry.name!r} is also stored in {self.entries[entry.name].where}")
        self.entries[entry.name] = entry


def numel(shape: Any) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n


def resolve_path(path: Path) -> Path:
    """The real path, or a CheckpointError naming a missing file, a dangling link or a loop."""
    try:
        resolved = path.resolve(strict=True)
    except RuntimeError:  # symlink loop on older Pythons
        raise CheckpointError(f"{path}: symlink loop") from None
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(f"{path}: dangling symlink") from None
        raise CheckpointError(f"{path}: no such file or directory") from None
    except OSError as exc:
        if "loop" in str(exc).lower() or getattr(exc, "errno", None) == 40:
            raise CheckpointError(f"{path}: symlink loop") from None
        raise CheckpointError(f"{path}: {exc}") from None
    return resolved


def listdir(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except PermissionError:
        raise CheckpointError(f"{p}: directory not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: directory cannot be read ({exc.strerror or exc})") from None


def is_regular(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def flatten(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0) -> None:
    """Nested containers -> {key.path: leaf}; lazy tensors stay leaves."""
    import argparse

    if depth > 100:
        out[prefix] = obj
        return
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        if not obj:
            out[prefix] = {}
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)) and not (isinstance(obj, tuple) and obj and isinstance(obj[0], str)
                                                 and len(obj) > 1 and all(isinstance(x, (int, str)) for x in obj)):
        if not obj:
            out[prefix] = type(obj)()
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}[{i}]", out, depth + 1)
    else:
        out[prefix] = obj


def side_file_value(path: Path) -> Any:
    """A json/txt/yaml file beside the tensors, as compared: parsed JSON where it parses, else bytes."""
    import json

    from pytest_miles._files import read_bytes

    text = read_bytes(path, what="side file")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text
