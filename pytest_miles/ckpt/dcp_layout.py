"""torch DCP checkpoints (`*.distcp` + `.metadata`; also Megatron's torch_dist): which tensor chunk
lies at which bytes of which file, read from `.metadata` in one pass, every entry validated.

Why it is written this way: a `.metadata` of 20,000 small tensors is a 4.4 MB pickle of ~150,000
objects, and comparing two such checkpoints must not cost more than hashing their data.
- The pickle goes through the restricted unpickler once per side (C code, ~70 ms here), the index
  is built with C-level helpers (`map`, `math.prod`, one storage dict), one pass, O(n).
- The second side usually holds the same `.metadata` byte for byte, except the save's ids (a random
  `save_id`, a path-dependent `checkpoint_id`), which DCP writes last. When its bytes are the first
  side's up to that tail and the tail differs only in those strings (`mirrored_ids`), its objects
  are the first side's with other ids: it is not unpickled again, its entries are the first side's
  relocated to its own files (`Layout.relocate`), whose existence and sizes are checked as usual.
  Anything else (other lengths, other bytes) takes the full path: the verdict never depends on it.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pytest_miles._files import SafeFile, read_bytes
from pytest_miles.ckpt.dcp_mirror import id_notes, mirrored_ids
from pytest_miles.ckpt.lazy import LazyTensor, materialize
from pytest_miles.ckpt.model import ITEMSIZE, CheckpointEntry, CheckpointError, Item, Layout, listdir
from pytest_miles.ckpt.torch_save import load_torch
from pytest_miles.ckpt.unpickle import load_pickle, unshare

_IDS = ("save_id", "checkpoint_id")


@dataclass
class DcpIndex:
    """What a second side needs to mirror this one: the raw `.metadata`, its id strings, the DCP
    entries, the files they use and how far into each (bytes), the `.metadata`-derived meta."""

    raw: bytes
    ids: dict[str, str]
    entries: dict[str, CheckpointEntry]
    files: dict[str, Path]
    ends: dict[str, int]
    meta: dict[str, Any]


def _decode(path: Path, key: str, offset: int, length: int, kind: str, dtype: str | None,
            sizes: tuple[int, ...] | None, transforms: Any, raw: bool) -> Any:
    """The value of one DCP item (only where bytes differ or layouts differ)."""
    with SafeFile(path) as f:
        data = f.pread(offset, length, f"item {key!r}")
    if transforms:
        from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

        try:
            data = _StorageReaderTransforms().transform_load_stream(None, transforms, io.BytesIO(data)).read()
        except Exception as exc:
            raise CheckpointError(f"{path}: item {key!r} at byte {offset} cannot be decoded ({exc})") from None
    if raw:
        import torch

        t = torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)) if data else torch.empty(
            0, dtype=getattr(torch, dtype))
        return t.reshape(sizes)
    obj = load_torch(data, f"{path} (item {key!r} at byte {offset})")
    if kind == "tensor":
        if not isinstance(obj, LazyTensor):
            raise CheckpointError(f"{path}: item {key!r} at byte {offset} is a {type(obj).__name__}, not a tensor")
        if obj.dtype != dtype or tuple(obj.size) != tuple(sizes or ()):
            raise CheckpointError(f"{path}: item {key!r} at byte {offset} holds {obj.dtype} {list(obj.size)}, "
                                  f".metadata says {dtype} {list(sizes or ())}")
    return materialize(obj)


def relocated(entry: CheckpointEntry, relocate: dict[Path, Path]) -> CheckpointEntry:
    """A mirrored entry as read from the other side's files (built only where its bytes differ)."""
    chunks = []
    for offsets, sizes, item in entry.chunks:
        file, d = relocate[item.file], item.decode
        decode = partial(d.func, file, *d.args[1:]) if isinstance(d, partial) else d
        chunks.append((offsets, sizes, Item(item.key, file, item.offset, item.length, item.order, item.kind,
                                            item.encoding, decode)))
    return CheckpointEntry(entry.name, entry.order, entry.kind, entry.dtype, entry.shape, chunks, entry.value,
                           entry.where)


def _storage_index(md: Any, meta_path: Path, budget: int) -> dict[tuple[str, tuple[int, ...]], tuple]:
    """(fqn, chunk offsets) -> (relative path, offset, length, transforms): one pass, its work paid
    from `budget` (shared offsets, see dcp_layout)."""
    storage: dict[tuple[str, tuple[int, ...]], tuple] = {}
    good_rel: set[str] = set()
    try:
        for index, info in md.storage_data.items():
            offset = getattr(index, "offset", None)
            if offset:
                budget -= len(offset)
                if budget < 0:
                    raise CheckpointError(f"{meta_path}: malformed: its storage entries share offsets far beyond "
                                          "its size (not what DCP writes)")
            rel = info.relative_path
            if rel not in good_rel:
                if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
                    raise ValueError(f"relative_path {rel!r}")
                good_rel.add(rel)
            o, n = int(info.offset), int(info.length)
            if o < 0 or n < 0:
                raise ValueError(f"offset {info.offset}, length {info.length}")
            storage[(str(index.fqn), tuple(map(int, offset)) if offset else ())] = (
                rel, o, n, getattr(info, "transform_descriptors", None))
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: malformed storage entry ({exc})") from None
    return storage


def _check_chunks(meta_path: Path, fqn: str, shape: tuple[int, ...], chunks: list) -> None:
    for offsets, csize in chunks:
        if len(offsets) != len(shape) or len(csize) != len(shape) or any(
                o < 0 or c < 0 or o + c > s for o, c, s in zip(offsets, csize, shape)):
            raise CheckpointError(f"{meta_path}: entry {fqn!r} chunk {list(offsets)}+{list(csize)} is outside "
                                  f"its tensor {list(shape)}")
    covered = sum(math.prod(c) for _, c in chunks)
    if covered != math.prod(shape):
        raise CheckpointError(f"{meta_path}: entry {fqn!r}: its chunks hold {covered} of the "
                              f"{math.prod(shape)} elements of {list(shape)}")


def _meta_and_notes(md: Any, layout: Layout) -> dict[str, str]:
    """The compared `.metadata` fields into layout.meta, the ignored ids into a note; the ids."""
    sm = getattr(md, "storage_meta", None)
    ids: dict[str, str] = {}
    if sm is not None:
        ids = {k: getattr(sm, k) for k in _IDS if getattr(sm, k, None)}
        rest = unshare({k: v for k, v in vars(sm).items() if k not in _IDS}, str(layout.root / ".metadata"))
        if rest:
            layout.meta[".metadata:storage_meta"] = rest
    _id_notes(layout, ids)
    planner = unshare(getattr(md, "planner_data", None), str(layout.root / ".metadata"))
    if isinstance(planner, dict):
        for fqn, value in planner.items():
            layout.meta[f".metadata:planner_data:{fqn}"] = value
    else:
        layout.meta[".metadata:planner_data"] = planner
    layout.meta[".metadata:version"] = getattr(md, "version", None)
    return ids


def _id_notes(layout: Layout, ids: dict[str, Any]) -> None:
    layout.notes.extend(id_notes(ids))


def _file_size(file: Path, meta_path: Path) -> int:
    """A data file `.metadata` lists: present, regular, readable (a FIFO is refused, never opened
    blocking); its size."""
    if not os.path.lexists(file):
        raise CheckpointError(f"{file}: listed in {meta_path} but missing")
    with SafeFile(file) as f:
        return f.size


def dcp_layout(root: Path, kind: str = "dcp", names: list[Path] | None = None, like: Layout | None = None) -> Layout:
    """The layout of a DCP dir; `like`: the other side's layout, mirrored when `.metadata` allows."""
    meta_path = root / ".metadata"
    raw = read_bytes(meta_path, what="DCP metadata")
    index = like.layout_info.get("dcp index") if like is not None else None
    if isinstance(index, DcpIndex):
        mirrored = _mirror(index, raw, root, meta_path, kind, names)
        if mirrored is not None:
            return mirrored
    md = load_pickle(raw, str(meta_path))
    for attr in ("state_dict_metadata", "storage_data"):
        if not isinstance(getattr(md, attr, None), dict):
            raise CheckpointError(f"{meta_path}: not DCP metadata (a {type(md).__name__} without {attr})")
    layout = Layout(kind, root)
    ids = _meta_and_notes(md, layout)
    # A file may share one size/offset object among many entries (pickle memo references): walking
    # it would then cost far more than the file's size (a hang on a hostile file). The storage index
    # and the entries each pay the dimensions they read from a budget sized from the file; DCP's own
    # files stay far inside it.
    budget = 4 * len(raw) + 100_000
    files = _Files(root, meta_path, _storage_index(md, meta_path, budget))
    dtypes: dict[int, str] = {}  # id(dtype object) -> name: one str() per distinct dtype
    entries = layout.entries
    for order, (fqn, tmd) in enumerate(md.state_dict_metadata.items()):
        fqn = str(fqn)
        ekind, dtype, shape, chunks, cost = _parse_entry(fqn, tmd, meta_path, dtypes)
        budget -= cost
        if budget < 0:
            raise CheckpointError(f"{meta_path}: malformed: its entries share sizes/chunks far beyond its "
                                  f"{len(raw)} bytes (not what DCP writes)")
        entry = CheckpointEntry(fqn, order, ekind, dtype, shape, [], None, ".metadata")
        for offsets, csize in chunks:
            entry.chunks.append((offsets, csize or (), files.item(fqn, offsets, csize, len(chunks) == 1, order,
                                                                 ekind, dtype)))
        if fqn in entries:
            raise CheckpointError(f"{meta_path}: {fqn!r} is also stored in {entries[fqn].where}")
        entries[fqn] = entry
    ends = {rel: _check_overlaps(files.paths[rel], ss, meta_path) for rel, ss in files.spans.items()}
    _unreferenced(layout, names, root, files.sizes)
    layout.layout_info["dcp index"] = DcpIndex(raw, ids, dict(entries), files.paths, ends, dict(layout.meta))
    return layout


def _parse_entry(fqn: str, tmd: Any, meta_path: Path, dtypes: dict[int, str]) -> tuple:
    """(kind, dtype, shape, chunks, dimensions read) of one `.metadata` entry, checked."""
    if type(tmd).__name__ == "BytesStorageMetadata":
        return "bytes", None, None, [((), None)], 0
    try:
        dt = tmd.properties.dtype
        dtype = dtypes.get(id(dt))
        if dtype is None:
            dtype = dtypes[id(dt)] = str(dt).replace("torch.", "")
        shape = tuple(map(int, tmd.size))
        chs = tmd.chunks
        if len(chs) == 1:  # the common case, without a comprehension's frame per tensor
            c = chs[0]
            chunks = [(tuple(map(int, c.offsets)), tuple(map(int, c.sizes)))]
        else:
            chunks = [(tuple(map(int, c.offsets)), tuple(map(int, c.sizes))) for c in chs]
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: entry {fqn!r} has no usable size/chunks ({exc})") from None
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{meta_path}: entry {fqn!r} has unknown dtype {dtype!r}")
    if len(chunks) != 1 or chunks[0][1] != shape or any(chunks[0][0]) or len(chunks[0][0]) != len(shape):
        _check_chunks(meta_path, fqn, shape, chunks)  # not the whole tensor in one chunk
    return "tensor", dtype, shape, chunks, len(shape) + sum(len(o) + len(c) for o, c in chunks)


class _Files:
    """The data files `.metadata` names (by relative path: hashing str, not Path, 20,000 times):
    their sizes, checked once each, and the byte spans their items take."""

    def __init__(self, root: Path, meta_path: Path, storage: dict) -> None:
        self.root, self.meta_path, self.storage = root, meta_path, storage
        self.sizes: dict[str, int] = {}
        self.paths: dict[str, Path] = {}
        self.spans: dict[str, list[tuple[int, int, str]]] = {}

    def item(self, fqn: str, offsets: tuple[int, ...], csize: Any, whole: bool, order: int, ekind: str,
             dtype: str | None) -> Item:
        """The item of one chunk: where its bytes are, how they are encoded, how to decode them."""
        found = self.storage.get((fqn, offsets))
        if found is None:
            raise CheckpointError(f"{self.meta_path}: no storage entry for {fqn!r} chunk {list(offsets)}")
        rel, offset, length, transforms = found
        file = self.paths.get(rel)
        if file is None:
            file = self.paths[rel] = self.root / rel
            self.sizes[rel] = _file_size(file, self.meta_path)
            self.spans[rel] = []
        if offset + length > self.sizes[rel]:
            raise CheckpointError(f"{file}: truncated: {fqn!r} needs bytes up to {offset + length}, "
                                  f"file has {self.sizes[rel]}")
        key = fqn if whole else f"{fqn}@{list(offsets)}"
        self.spans[rel].append((offset, length, key))
        raw_item = ekind == "tensor" and not transforms and length == math.prod(csize) * ITEMSIZE[dtype]
        decode = partial(_decode, file, key, offset, length, ekind, dtype, csize, transforms, raw_item)
        encoding = ("raw",) if raw_item else ("torch.save", bool(transforms))
        return Item(key, file, offset, length, order, ekind, encoding, decode)


def _check_overlaps(file: Path, spans: list[tuple[int, int, str]], meta_path: Path) -> int:
    """Two items sharing bytes: a corrupt index. Returns how far into the file the items reach."""
    spans.sort()  # already in file order as DCP writes them: linear
    end, last = 0, None
    for o, n, k in spans:
        if n and o < end:
            lo, ln, lk = last
            raise CheckpointError(f"{file}: {lk!r} and {k!r} overlap (bytes {lo}+{ln} and {o}+{n}) per {meta_path}")
        if n and o + n > end:
            end, last = o + n, (o, n, k)
    return end


def _unreferenced(layout: Layout, names: list[Path] | None, root: Path, referenced: Any) -> None:
    for p in names or listdir(root):
        if p.suffix == ".distcp" and p.name not in referenced:
            layout.notes.append(f"{p.name}: not referenced by .metadata")
            layout.side_files[p.name] = p


def _mirror(index: DcpIndex, raw: bytes, root: Path, meta_path: Path, kind: str,
            names: list[Path] | None) -> Layout | None:
    """This side's layout as `index`'s side relocated, when its `.metadata` differs only in the ids."""
    mine = mirrored_ids(index.raw, raw, index.ids)
    if mine is None:
        return None
    layout = Layout(kind, root)
    sizes = {}
    for rel, end in index.ends.items():
        file = root / rel
        sizes[rel] = _file_size(file, meta_path)
        if sizes[rel] < end:
            return None  # truncated: the full path names the first tensor that does not fit
        layout.relocate[index.files[rel]] = file
    layout.entries.update(index.entries)
    layout.meta.update(index.meta)
    _id_notes(layout, mine)
    _unreferenced(layout, names, root, sizes)
    return layout  # no index of its own: its entries are the other side's (not mirrored again)
