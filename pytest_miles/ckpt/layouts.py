"""What is inside a checkpoint, and where: named entries (tensors as chunks = byte ranges in files,
plus non-tensor values), whatever the files they were written to.

Formats: Megatron save dirs (`latest_checkpointed_iteration.txt` -> `iter_XXXXXXX/`, torch_dist or
legacy `mp_rank_NN[_PPP]/model_optim_rng.pt`), torch DCP dirs (`*.distcp` + `.metadata`),
safetensors files and HF dirs (sharded, with an index json), and `.pt` files or dirs of them.
Every file is opened through safe_io (regular files only, bounded reads) and every pickle through
unpickle (nothing called). Every error names the file and is a `CheckpointError`.
"""

from __future__ import annotations

import gc
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles._files import CheckpointError, SafeFile, read_text
from pytest_miles.ckpt.unpickle import LazyTensor, load_torch

__all__ = ["CheckpointError", "Entry", "Item", "Layout", "load_layout", "megatron_iteration_dir"]


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
class Entry:
    """One named thing: a tensor (global dtype/shape, stored as chunks), a DCP byte item, or a value."""

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
    kind: str
    root: Path
    entries: dict[str, Entry] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # compared semantically
    side_files: dict[str, Path] = field(default_factory=dict)  # json/txt next to the tensors
    notes: list[str] = field(default_factory=list)
    layout_info: dict[str, Any] = field(default_factory=dict)  # how it is stored: reported, not compared
    # entries shared with the other side's layout (same Entry objects: its `.metadata` mirrors this
    # one's, see dcp_layout): their items are read from these files instead
    relocate: dict[Path, Path] = field(default_factory=dict)

    def add(self, entry: Entry, source: Path) -> None:
        if entry.name in self.entries:
            raise CheckpointError(f"{source}: {entry.name!r} is also stored in {self.entries[entry.name].where}")
        self.entries[entry.name] = entry


SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "float8_e8m0fnu": 1, "complex64": 8, "complex128": 16}
ITER_RE = re.compile(r"iter_(\d{7})$")
MP_RANK_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
SIDE_SUFFIXES = (".json", ".txt", ".yaml", ".yml")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _resolve(path: Path) -> Path:
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


def _listdir(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except PermissionError:
        raise CheckpointError(f"{p}: directory not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: directory cannot be read ({exc.strerror or exc})") from None


def _regular(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def _raw_item(key: str, path: Path, offset: int, length: int, order: int, dtype: str, shape: tuple[int, ...]) -> Item:
    def decode():
        import torch

        with SafeFile(path) as f:
            buf = bytearray(f.pread(offset, length, f"tensor {key!r}"))
        t = torch.frombuffer(buf, dtype=getattr(torch, dtype)) if length else torch.empty(0, dtype=getattr(torch, dtype))
        return t.reshape(shape)

    return Item(key, path, offset, length, order, "tensor", "raw", decode)


# ---- safetensors ---------------------------------------------------------------------------


def _safetensors_entries(path: Path, start_order: int, layout: Layout) -> tuple[int, list[str], Any]:
    """Entries of one safetensors file; returns (next order, tensor names, its __metadata__)."""
    with SafeFile(path) as f:
        size = f.size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", f.pread(0, 8))
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
        raw = f.pread(8, n, "safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a {type(header).__name__}, not an object)")
    base = 8 + n
    meta = header.pop("__metadata__", None)
    parsed = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r} ({exc!r})") from None
        if begin < 0 or end < begin or any(s < 0 for s in shape):
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r} (offsets [{begin}, {end}], shape {list(shape)})")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        if end - begin != _numel(shape) * ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: {end - begin} bytes for "
                                  f"{list(shape)} {dtype} ({_numel(shape) * ITEMSIZE[dtype]} expected)")
        parsed.append((begin, end, name, dtype, shape))
    parsed.sort()
    prev_end, prev = 0, None
    for begin, end, name, _, _ in parsed:
        if begin < prev_end and end > begin:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} at [{begin}, {end}) "
                                  f"overlaps {prev!r}")
        if end > begin:
            prev_end, prev = end, name
    order = start_order
    for begin, end, name, dtype, shape in parsed:
        item = _raw_item(name, path, base + begin, end - begin, order, dtype, shape)
        layout.add(Entry(name, order, "tensor", dtype, shape, [((0,) * len(shape), shape, item)], where=path.name), path)
        order += 1
    return order, [p[2] for p in parsed], meta


def _hf_layout(root: Path, files: list[Path] | None = None) -> Layout:
    layout = Layout("safetensors", root)
    entries = _listdir(root) if files is None else files
    index = sorted(e for e in entries if e.name.endswith(".safetensors.index.json")) if files is None else []
    shards = [e for e in entries if e.suffix == ".safetensors"]
    weight_map: dict[str, str] | None = None
    if index:
        try:
            weight_map = json.loads(read_text(index[0], what="safetensors index"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index[0]}: unusable safetensors index ({exc!r})") from None
        wanted = sorted(set(map(str, weight_map.values())))
        for name in wanted:
            if "/" in name or not (root / name).exists():
                raise CheckpointError(f"{root / name}: shard listed in {index[0].name} is missing")
        extra = [s for s in shards if s.name not in set(wanted)]
        if extra:
            layout.notes.append(f"shards not in {index[0].name}: {', '.join(s.name for s in extra)}")
        shards = [root / n for n in wanted] + extra
    order = 0
    metas = []
    for shard in shards:
        order, names, meta = _safetensors_entries(shard, order, layout)
        if meta is not None:
            metas.append(json.dumps(meta, sort_keys=True))
        if weight_map is not None:
            for name in names:
                if name in weight_map and weight_map[name] != shard.name:
                    raise CheckpointError(f"{shard}: holds {name!r}, which {index[0].name} places in {weight_map[name]}")
    if weight_map is not None:
        absent = [k for k, v in weight_map.items() if k not in layout.entries]
        if absent:
            raise CheckpointError(f"{root / weight_map[absent[0]]}: does not hold {absent[0]!r}, which "
                                  f"{index[0].name} places there ({len(absent)} such tensor(s))")
    if metas:  # per tensor set, whatever the file names and the shard split
        layout.meta["safetensors __metadata__"] = sorted(set(metas))
    layout.layout_info["safetensors files"] = sorted(s.name for s in shards)
    if files is None:
        for p in entries:
            if _regular(p) and p.suffix in SIDE_SUFFIXES and not p.name.endswith(".safetensors.index.json"):
                layout.side_files[p.name] = p
    return layout


# ---- torch DCP -----------------------------------------------------------------------------


def _dcp_layout(root: Path, kind: str = "dcp", names: list[Path] | None = None, like: Layout | None = None) -> Layout:
    from pytest_miles.ckpt.dcp_layout import dcp_layout

    return dcp_layout(root, kind, names, like)


# ---- torch.save files ----------------------------------------------------------------------


def _flatten(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0) -> None:
    """Nested containers -> {key.path: leaf}; LazyTensors stay leaves."""
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
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)) and not (isinstance(obj, tuple) and obj and isinstance(obj[0], str)
                                                 and len(obj) > 1 and all(isinstance(x, (int, str)) for x in obj)):
        if not obj:
            out[prefix] = type(obj)()
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out, depth + 1)
    else:
        out[prefix] = obj


def _add_torch_file(layout: Layout, path: Path, prefix: str, order: int) -> int:
    obj = load_torch(path)
    flat: dict[str, Any] = {}
    _flatten(obj, "", flat)
    leaves = {(prefix + k if k else prefix.rstrip(":") or "(root)"): v for k, v in flat.items()}
    for name, value in leaves.items():
        if isinstance(value, LazyTensor):
            off, length = value.byte_span()
            t = value

            def decode(t=t):
                return t.materialize()

            enc = ("pt", value.stride if not value.is_contiguous() else "contiguous")
            item = Item(name, path, off, length, order, "tensor", enc, decode)
            entry = Entry(name, order, "tensor", value.dtype, tuple(value.size),
                          [((0,) * len(value.size), tuple(value.size), item)], where=path.name)
        else:
            entry = Entry(name, order, "value", value=value, where=path.name)
        layout.add(entry, path)
        order += 1
    return order


def _torch_files_layout(root: Path, files: list[Path], kind: str = "torch", single: bool = False) -> Layout:
    layout = Layout(kind, root)
    order = 0
    for path in files:
        rel = path.name if path.parent == root else str(path.relative_to(root))
        order = _add_torch_file(layout, path, "" if single else f"{rel}:", order)
    return layout


def _legacy_megatron_layout(root: Path, ranks: list[Path]) -> Layout:
    """iter_XXXXXXX/mp_rank_NN[_PPP]/model_optim_rng.pt (Megatron-LM's non-distributed format)."""
    files = []
    for d in ranks:
        pts = [p for p in _listdir(d) if p.suffix in TORCH_SUFFIXES]
        if not pts:
            raise CheckpointError(f"{d}: legacy Megatron rank dir without a .pt file")
        files.extend(pts)
    layout = _torch_files_layout(root, files, "megatron-legacy")
    tp = sorted({MP_RANK_RE.search(d.name).group(1) for d in ranks})
    pp = sorted({MP_RANK_RE.search(d.name).group(2) or "000" for d in ranks})
    layout.layout_info["legacy ranks"] = f"{len(tp)} tensor-parallel x {len(pp)} pipeline ranks"
    return layout


# ---- detection -----------------------------------------------------------------------------


def megatron_iteration_dir(root: Path) -> Path | None:
    tracker = root / "latest_checkpointed_iteration.txt"
    if not os.path.lexists(tracker):
        return None
    text = read_text(tracker, limit=4096, what="Megatron tracker").strip()
    if text == "release":
        return root / "release"
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
    it = root / f"iter_{int(text):07d}"
    if not it.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {int(text)}, but {it} does not exist")
    return it


def load_layout(path: str | os.PathLike, like: Layout | None = None) -> Layout:
    """Find what kind of checkpoint `path` is and list what it holds (`like`: the layout of the
    other side of a comparison, whose DCP index this one may mirror instead of parsing again).

    The cyclic GC is paused meanwhile: building 100,000s of small objects (a 20,000-tensor
    `.metadata`) otherwise triggers full collections again and again (seconds, not ms)."""
    was = gc.isenabled()
    gc.disable()
    try:
        return _load_layout(path, like)
    finally:
        if was:
            gc.enable()


def _load_layout(path: str | os.PathLike, like: Layout | None = None) -> Layout:
    p = _resolve(Path(path))
    if not p.is_dir():
        SafeFile(p).close()  # regular file or a clear refusal (FIFO, socket, device)
        if p.suffix == ".safetensors":
            return _hf_layout(p.parent, [p])
        if p.name.endswith(".safetensors.index.json"):
            return _hf_layout(p.parent)
        if p.suffix in TORCH_SUFFIXES:
            return _torch_files_layout(p.parent, [p], single=True)
        raise CheckpointError(f"{p}: not a checkpoint file (expected .safetensors, .pt, .pth or .bin)")
    it = megatron_iteration_dir(p)
    if it is not None:
        layout = _load_layout(it, like)
        layout.kind = f"megatron/{layout.kind}" if not layout.kind.startswith("megatron") else layout.kind
        layout.notes.append(f"{p.name}/latest_checkpointed_iteration.txt -> {it.name}")
        return layout
    entries = _listdir(p)
    names = {e.name for e in entries}
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        if ".metadata" not in names:
            raise CheckpointError(f"{p}: has .distcp files but no .metadata")
        layout = _dcp_layout(p, "dcp", entries, like)
        order = len(layout.entries)
        for e in entries:  # Megatron's common.pt and metadata.json beside the DCP files
            if e.suffix in TORCH_SUFFIXES and not e.is_dir():
                order = _add_torch_file(layout, e, f"{e.name}:", order)
            elif _regular(e) and e.suffix in SIDE_SUFFIXES:
                layout.side_files[e.name] = e
        return layout
    if any(n.endswith(".safetensors") for n in names):
        return _hf_layout(p)
    ranks = [e for e in entries if e.is_dir() and MP_RANK_RE.search(e.name)]
    if ranks:
        return _legacy_megatron_layout(p, ranks)
    pts = [e for e in entries if e.suffix in TORCH_SUFFIXES and not e.is_dir()]
    if pts:
        layout = _torch_files_layout(p, pts)
        for e in entries:
            if _regular(e) and e.suffix in SIDE_SUFFIXES:
                layout.side_files[e.name] = e
        return layout
    iters = sorted(e for e in entries if e.is_dir() and ITER_RE.search(e.name))
    hint = f" (it has {iters[-1].name}/ but no latest_checkpointed_iteration.txt)" if iters else ""
    raise CheckpointError(f"{p}: no checkpoint found (no .metadata/.distcp, .safetensors, .pt files or "
                          f"mp_rank_* dirs){hint}")
