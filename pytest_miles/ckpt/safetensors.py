"""safetensors files and HF dirs (sharded, with a `*.safetensors.index.json`): every tensor's bytes
located from the JSON header, every header checked (offsets, sizes, overlaps, the index's shards).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pytest_miles._files import SafeFile, read_text
from pytest_miles.ckpt.model import (
    ITEMSIZE,
    SIDE_SUFFIXES,
    CheckpointEntry,
    CheckpointError,
    Item,
    Layout,
    is_regular,
    listdir,
    numel,
)

__all__ = ["SAFETENSORS_DTYPES", "hf_layout", "raw_item"]

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}


def raw_item(key: str, path: Path, offset: int, length: int, order: int, dtype: str, shape: tuple[int, ...]) -> Item:
    def decode():
        import torch

        with SafeFile(path) as f:
            buf = bytearray(f.pread(offset, length, f"tensor {key!r}"))
        dt = getattr(torch, dtype)  # bytes viewed: frombuffer does not take every dtype (FP8)
        t = torch.frombuffer(buf, dtype=torch.uint8).view(dt) if length else torch.empty(0, dtype=dt)
        return t.reshape(shape)

    return Item(key, path, offset, length, order, "tensor", "raw", decode)


MAX_HEADER = 100_000_000  # the safetensors library's MAX_HEADER_SIZE


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"name {dup!r} appears twice")
    return out


def _u64(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**64


def _header(path: Path, raw: bytes) -> dict:
    """The JSON header as strictly as the safetensors library reads it: UTF-8 without a byte-order
    mark, no NaN/Infinity, an object. Stricter on one point: a name twice is refused (the library
    keeps the last one silently; two tensors of one name would make a comparison ambiguous)."""
    import json  # only where a safetensors file is read (start-up of other comparisons)

    try:
        text = raw.decode("utf-8")  # a byte-order mark is refused by json, as by the library
        header = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a {type(header).__name__}, not an object)")
    return header


def _entry(path: Path, name: str, info: Any) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry: offsets and shape non-negative integers (no
    strings, floats or booleans), a known dtype, as the library requires."""
    bad = "expected {dtype: string, shape: [integers >= 0], data_offsets: [begin, end] integers >= 0}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: corrupt safetensors entry {name!r} ({bad})")
    offsets, shape, dtype = info["data_offsets"], info["shape"], info["dtype"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_u64, offsets))) or not (
            isinstance(shape, list) and all(map(_u64, shape))) or not isinstance(dtype, str):
        raise CheckpointError(f"{path}: corrupt safetensors entry {name!r} ({bad}; got offsets {offsets!r:.60}, "
                              f"shape {shape!r:.60}, dtype {dtype!r:.30})")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: safetensors entry {name!r}: dtype {dtype!r:.30} not supported "
                              f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    return offsets[0], offsets[1], SAFETENSORS_DTYPES[dtype], tuple(shape)


def _safetensors_entries(path: Path, start_order: int, layout: Layout) -> tuple[int, list[str], Any]:
    """Entries of one safetensors file; returns (next order, tensor names, its __metadata__)."""
    with SafeFile(path) as f:
        size = f.size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", f.pread(0, 8))
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
        raw = f.pread(8, n, "safetensors header")
    header = _header(path, raw)
    base = 8 + n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    parsed = []
    for name, info in header.items():
        begin, end, dtype, shape = _entry(path, name, info)
        if end < begin:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r} (offsets [{begin}, {end}])")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        if end - begin != numel(shape) * ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: {end - begin} bytes for "
                                  f"{list(shape)} {dtype} ({numel(shape) * ITEMSIZE[dtype]} expected)")
        parsed.append((begin, end, name, dtype, shape))
    parsed.sort()
    prev_end, prev = 0, None
    for begin, end, name, _, _ in parsed:  # the library's rule: tensors tile the data, in offset order
        if begin != prev_end:
            what = f"overlaps {prev!r}" if begin < prev_end else f"leaves bytes [{prev_end}, {begin}) unused"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} at [{begin}, {end}) {what}")
        prev_end, prev = end, name
    if base + prev_end != size:
        raise CheckpointError(f"{path}: corrupt safetensors file: its tensors end at byte {base + prev_end}, the file "
                              f"has {size} (the library accepts no bytes after the tensors)")
    order = start_order
    for begin, end, name, dtype, shape in parsed:
        item = raw_item(name, path, base + begin, end - begin, order, dtype, shape)
        chunks = [((0,) * len(shape), shape, item)]
        entry = CheckpointEntry(name, order, "tensor", dtype, shape, chunks, where=path.name)
        layout.add(entry, path)
        order += 1
    return order, [p[2] for p in parsed], meta


def hf_layout(root: Path, files: list[Path] | None = None) -> Layout:
    import json

    layout = Layout("safetensors", root)
    entries = listdir(root) if files is None else files
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
                    raise CheckpointError(
                        f"{shard}: holds {name!r}, which {index[0].name} places in {weight_map[name]}"
                    )
    if weight_map is not None:
        absent = [k for k, v in weight_map.items() if k not in layout.entries]
        if absent:
            raise CheckpointError(
                f"{root / weight_map[absent[0]]}: does not hold {absent[0]!r}, which "
                f"{index[0].name} places there ({len(absent)} such tensor(s))"
            )
    if metas:  # per tensor set, whatever the file names and the shard split
        layout.meta["safetensors __metadata__"] = sorted(set(metas))
    layout.layout_info["safetensors files"] = sorted(s.name for s in shards)
    if files is None:
        for p in entries:
            if is_regular(p) and p.suffix in SIDE_SUFFIXES and not p.name.endswith(".safetensors.index.json"):
                layout.side_files[p.name] = p
    return layout
