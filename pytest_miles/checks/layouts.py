"""What is inside a checkpoint, and where: tensors as byte ranges in files, plus metadata.

Formats: Megatron save dirs (`latest_checkpointed_iteration.txt` -> `iter_XXXXXXX/`), torch DCP
dirs (`*.distcp` + `.metadata`), safetensors files and HF dirs (sharded, with an index json),
and `.pt` files or dirs of them. Every error names the file and is a `CheckpointError`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CheckpointError(Exception):
    """Unusable input (exit 2): names the file and what is wrong with it."""


@dataclass
class Item:
    """One comparable unit: a tensor (or tensor chunk) stored at [offset, offset+length) of file."""

    key: str
    file: Path
    offset: int
    length: int
    order: int
    kind: str = "tensor"  # tensor | bytes | file
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    decode: Callable[[], Any] | None = None


@dataclass
class Layout:
    kind: str
    root: Path
    items: dict[str, Item] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # compared semantically
    side_files: dict[str, Path] = field(default_factory=dict)  # json/txt next to the tensors
    notes: list[str] = field(default_factory=list)


SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
ITER_RE = re.compile(r"iter_(\d{7})$")
SIDE_SUFFIXES = (".json", ".txt", ".yaml", ".yml")


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise CheckpointError(f"{path}: not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None


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


# ---- safetensors ---------------------------------------------------------------------------


def _safetensors_items(path: Path, start_order: int, layout: Layout, prefix: str = "") -> int:
    _check_readable(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    base = 8 + n
    meta = header.pop("__metadata__", None)
    if meta:
        layout.meta[f"{prefix}{path.name}:__metadata__"] = meta
    order = start_order
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        try:
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r} ({exc!r})") from None
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        item = Item(name, path, base + begin, end - begin, order, "tensor", dtype, shape)
        item.decode = _raw_decoder(path, base + begin, end - begin, dtype, shape)
        if name in layout.items:
            raise CheckpointError(f"{path}: tensor {name!r} also stored in {layout.items[name].file.name}")
        layout.items[name] = item
        order += 1
    return order


def _raw_decoder(path: Path, offset: int, length: int, dtype: str, shape: tuple[int, ...]):
    def decode():
        import torch

        buf = bytearray(length)
        with open(path, "rb") as f:
            f.seek(offset)
            f.readinto(buf)
        t = torch.frombuffer(buf, dtype=getattr(torch, dtype)) if length else torch.empty(0, dtype=getattr(torch, dtype))
        return t.reshape(shape)

    return decode


def _hf_layout(root: Path) -> Layout:
    layout = Layout("safetensors", root)
    index = sorted(root.glob("*.safetensors.index.json"))
    shards = sorted(root.glob("*.safetensors"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index[0]}: unusable safetensors index ({exc!r})") from None
        wanted = sorted(set(weight_map.values()))
        for name in wanted:
            if not (root / name).exists():
                raise CheckpointError(f"{root / name}: shard listed in {index[0].name} is missing")
        shard_set = [root / n for n in wanted]
        extra = [s for s in shards if s.name not in set(wanted)]
        if extra:
            layout.notes.append(f"shards not in {index[0].name}: {', '.join(s.name for s in extra)}")
        shards = shard_set + extra
    order = 0
    for shard in shards:
        order = _safetensors_items(shard, order, layout)
    layout.meta["storage placement (file, offset) [layout only]"] = sorted(
        (k, it.file.name, it.offset) for k, it in layout.items.items())
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in SIDE_SUFFIXES and not p.name.endswith(".safetensors.index.json"):
            layout.side_files[p.name] = p
    return layout


# ---- torch DCP -----------------------------------------------------------------------------


class _Stub:
    """Stand-in for a torch class inside DCP `.metadata`: holds its fields, compares by value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, (dict, type(None))) for x in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # a custom __getstate__ (TensorProperties: (dtype, layout, requires_grad, ...))
            self.state = state
            if type(self).__name__ == "TensorProperties" and isinstance(state, tuple) and state:
                self.dtype = state[0]

    def _key(self) -> tuple:
        return (type(self).__name__, tuple(sorted((k, _freeze(v)) for k, v in self.__dict__.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Stub) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


class _Ref:
    """A torch global (dtype, layout, helper function) named, not imported; calls are recorded."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> _Ref:
        return _Ref(f"{self.name}{args!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


class _MetadataUnpickler(pickle.Unpickler):
    """Reads `.metadata` without importing torch and without running code from the file:
    torch classes become `_Stub`s, dtypes their names, anything else outside a small allow-list
    is refused."""

    _stubs: dict[str, type] = {}
    _allowed = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("copyreg", "_reconstructor"),
                ("builtins", "object"), ("enum", "Enum")}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name == "Size":
            return tuple
        if module.split(".")[0] == "torch":
            if not re.fullmatch(r"_?[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*", name):  # float32, _get_layout, ...
                return _Ref(f"{module}.{name}")
            if name not in self._stubs:
                self._stubs[name] = type(name, (_Stub,), {})
            return self._stubs[name]
        if module == "pathlib":  # checkpoint_id may be a Path; keep it as text
            return lambda *parts: os.path.join(*map(str, parts)) if parts else ""
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def _load_dcp_metadata(path: Path):
    _check_readable(path)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated DCP metadata ({type(exc).__name__}: {exc})") from None


def _dcp_decoder(path: Path, info, kind: str):
    def decode():
        import torch

        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        stream: Any = io.BytesIO(data)
        if getattr(info, "transform_descriptors", None):
            from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

            stream = _StorageReaderTransforms().transform_load_stream(None, info.transform_descriptors, stream)
            stream = io.BytesIO(stream.read())
        try:
            return torch.load(stream, map_location="cpu", weights_only=(kind == "tensor"))
        except Exception as exc:
            raise CheckpointError(f"{path}: item at byte {info.offset} cannot be decoded ({exc})") from None

    return decode


def _dcp_layout(root: Path, kind: str = "dcp") -> Layout:
    meta_path = root / ".metadata"
    md = _load_dcp_metadata(meta_path)
    layout = Layout(kind, root)

    sm = md.storage_meta
    ignored = []
    if sm is not None:
        ignored = [f"{k}={getattr(sm, k)!s}" for k in ("save_id", "checkpoint_id") if getattr(sm, k, None)]
        rest = {k: v for k, v in vars(sm).items() if k not in ("save_id", "checkpoint_id")}
        if rest:
            layout.meta[".metadata:storage_meta"] = rest
    layout.notes.append(".metadata: save_id and checkpoint_id are ignored (random per save / path-dependent)")
    if ignored:
        layout.notes.append(f".metadata: {'; '.join(ignored)}")
    if isinstance(md.planner_data, dict):
        for fqn, value in md.planner_data.items():
            layout.meta[f".metadata:planner_data:{fqn}"] = value
    else:
        layout.meta[".metadata:planner_data"] = md.planner_data
    layout.meta[".metadata:version"] = getattr(md, "version", None)
    sizes: dict[str, int] = {}
    order = 0
    for fqn, tmd in md.state_dict_metadata.items():
        if type(tmd).__name__ == "BytesStorageMetadata":
            layout.meta[f".metadata:{fqn}"] = "bytes"
            chunks = [((), None)]
        else:
            dtype = str(tmd.properties.dtype).replace("torch.", "")
            if not hasattr(tmd, "chunks") or not hasattr(tmd, "size"):
                raise CheckpointError(f"{meta_path}: entry {fqn!r} has no size/chunks")
            layout.meta[f".metadata:{fqn}"] = {
                "dtype": dtype, "size": list(tmd.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in tmd.chunks],
            }
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in tmd.chunks]
        for offsets, csize in chunks:
            index = _find_storage(md.storage_data, fqn, offsets)
            if index is None:
                raise CheckpointError(f"{meta_path}: no storage entry for {fqn!r} chunk {list(offsets)}")
            info = md.storage_data[index]
            file = root / info.relative_path
            if file not in sizes:
                if not file.exists():
                    raise CheckpointError(f"{file}: listed in {meta_path} but missing")
                _check_readable(file)
                sizes[file] = file.stat().st_size
            if info.offset + info.length > sizes[file]:
                raise CheckpointError(f"{file}: truncated: {fqn!r} needs bytes up to {info.offset + info.length}, "
                                      f"file has {sizes[file]}")
            key = fqn if len(chunks) == 1 else f"{fqn}@{list(offsets)}"
            item_kind = "bytes" if csize is None else "tensor"
            item = Item(key, file, info.offset, info.length, order, item_kind,
                        None if csize is None else dtype, csize)
            item.decode = _dcp_decoder(file, info, item_kind)
            layout.items[key] = item
            order += 1
    placement = sorted((k, it.file.name, it.offset) for k, it in layout.items.items())
    layout.meta["storage placement (file, offset) [layout only]"] = placement
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix == ".distcp" and p not in sizes:
            layout.notes.append(f"{p.name}: not referenced by .metadata")
            layout.side_files[p.name] = p
    return layout


def _find_storage(storage_data, fqn: str, offsets: tuple[int, ...]):
    for index in storage_data:
        if index.fqn == fqn and tuple(getattr(index, "offset", None) or ()) == tuple(offsets):
            return index
    for index in storage_data:  # byte items are indexed without an offset
        if index.fqn == fqn and not offsets:
            return index
    return None


# ---- torch.save files ----------------------------------------------------------------------


def _torch_file_decoder(path: Path):
    def decode():
        import torch

        try:
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: corrupt or truncated torch file ({type(exc).__name__}: {exc})") from None

    return decode


def _check_torch_file(path: Path) -> None:
    import zipfile

    _check_readable(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: corrupt or truncated torch file ({exc})") from None
    elif not magic:
        raise CheckpointError(f"{path}: empty file")


def _torch_files_layout(root: Path, files: list[Path], kind: str = "torch") -> Layout:
    layout = Layout(kind, root)
    for order, path in enumerate(files):
        _check_torch_file(path)
        rel = path.name if path.parent == root else str(path.relative_to(root))
        item = Item(rel, path, 0, path.stat().st_size, order, "file")
        item.decode = _torch_file_decoder(path)
        layout.items[rel] = item
    return layout


# ---- detection -----------------------------------------------------------------------------


def megatron_iteration_dir(root: Path) -> Path | None:
    tracker = root / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release"
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
    it = root / f"iter_{int(text):07d}"
    if not it.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {int(text)}, but {it} does not exist")
    return it


def load_layout(path: str | os.PathLike) -> Layout:
    """Find what kind of checkpoint `path` is and list what it holds."""
    p = _resolve(Path(path))
    if p.is_file():
        if p.suffix == ".safetensors":
            layout = Layout("safetensors", p.parent)
            _safetensors_items(p, 0, layout)
            return layout
        if p.name.endswith(".safetensors.index.json"):
            return _hf_layout(p.parent)
        if p.suffix in (".pt", ".pth", ".bin"):
            layout = _torch_files_layout(p.parent, [p])
            item = layout.items.pop(p.name)
            item.key = ""  # one file against one file: key paths start inside it
            layout.items[""] = item
            return layout
        raise CheckpointError(f"{p}: not a checkpoint file (expected .safetensors, .pt, .pth or .bin)")
    it = megatron_iteration_dir(p)
    if it is not None:
        layout = load_layout(it)
        layout.kind = f"megatron/{layout.kind}"
        layout.notes.append(f"{p.name}/latest_checkpointed_iteration.txt -> {it.name}")
        return layout
    try:
        entries = sorted(p.iterdir())
    except PermissionError:
        raise CheckpointError(f"{p}: directory not readable (permission denied)") from None
    names = {e.name for e in entries}
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        if ".metadata" not in names:
            raise CheckpointError(f"{p}: has .distcp files but no .metadata")
        layout = _dcp_layout(p, "dcp")
        for e in entries:  # Megatron's common.pt and metadata.json beside the DCP files
            if e.is_file() and e.suffix in (".pt",):
                _check_torch_file(e)
                item = Item(e.name, e, 0, e.stat().st_size, len(layout.items), "file")
                item.decode = _torch_file_decoder(e)
                layout.items[e.name] = item
            elif e.is_file() and e.suffix in SIDE_SUFFIXES:
                layout.side_files[e.name] = e
        return layout
    if any(n.endswith(".safetensors") for n in names):
        return _hf_layout(p)
    pts = [e for e in entries if e.is_file() and e.suffix in (".pt", ".pth", ".bin")]
    if pts:
        layout = _torch_files_layout(p, pts)
        for e in entries:
            if e.is_file() and e.suffix in SIDE_SUFFIXES:
                layout.side_files[e.name] = e
        return layout
    iters = sorted(e for e in entries if e.is_dir() and ITER_RE.search(e.name))
    hint = f" (it has {iters[-1].name}/ but no latest_checkpointed_iteration.txt)" if iters else ""
    raise CheckpointError(f"{p}: no checkpoint found (no .metadata/.distcp, .safetensors or .pt files){hint}")
