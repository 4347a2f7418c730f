"""Checkpoint manifests: per-tensor, per-chunk and per-layer SHA-256 digests of a checkpoint, written
beside it (never inside), so that a run can be compared with one whose files are gone or elsewhere.

A manifest is one more checkpoint format: `build_manifest` reads any checkpoint through
`load_layout`, streaming tensors stored as one raw chunk straight from their files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pytest_miles._files import SafeFile, aligned_buffer, read_bytes, write_atomic
from pytest_miles.ckpt.layouts import load_layout
from pytest_miles.ckpt.lazy import LazyTensor, flatten_values
from pytest_miles.ckpt.model import ITEMSIZE, CheckpointEntry, CheckpointError, numel, side_file_value
from pytest_miles.ckpt.torch_save import load_torch

__all__ = ["MANIFEST_CHUNK_ELEMENTS", "MANIFEST_FORMAT", "MANIFEST_FORMATS", "build_manifest", "is_manifest",
           "write_manifest"]

MANIFEST_FORMAT = "pytest-miles/checkpoint-manifest/2"
MANIFEST_FORMATS = ("pytest-miles/checkpoint-manifest/1", MANIFEST_FORMAT)
MANIFEST_CHUNK_ELEMENTS = 2**20
_LAYER_RE = re.compile(r"^(.*?\blayers\.\d+)\.")


def is_manifest(path: Path) -> bool:
    try:
        head = read_bytes(path, limit=2**30, what="manifest")
        return json.loads(head).get("format") in MANIFEST_FORMATS
    except (CheckpointError, ValueError, AttributeError):
        return False


def _is_tensor(x: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _digest_value(v: Any) -> str:
    h = hashlib.sha256()
    if isinstance(v, LazyTensor):
        v = v.materialize()
    if _is_tensor(v):
        import torch

        t = v.detach().contiguous().cpu()
        h.update(f"{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(v).encode())
    return h.hexdigest()


def _tensor_digests(e: CheckpointEntry) -> tuple[str, list[str]]:
    """(digest of the whole tensor, digests of each MANIFEST_CHUNK_ELEMENTS-element range).
    A tensor stored as one chunk (raw, or one contiguous tensor in a torch.save item) is streamed
    from its file through a page-aligned buffer; others are assembled first."""
    itemsize = ITEMSIZE[e.dtype or "uint8"]
    whole = hashlib.sha256(f"torch.{e.dtype}|{list(e.shape or ())}|".encode())
    parts: list[str] = []
    step = MANIFEST_CHUNK_ELEMENTS * itemsize
    span = _stored_span(e, itemsize)
    if span is not None:
        file, offset, length = span
        buf = aligned_buffer(min(step, length))
        with SafeFile(file) as f:
            for pos in range(0, length, step):
                n = min(step, length - pos)
                if f.preadinto(buf[:n], offset + pos) != n:
                    raise CheckpointError(f"{file}: truncated while reading tensor {e.name!r} (file shrank?)")
                whole.update(buf[:n])
                parts.append(hashlib.sha256(buf[:n]).hexdigest())
    else:
        import torch

        flat = e.assemble().contiguous().reshape(-1).view(torch.uint8).numpy()
        for pos in range(0, len(flat), step):
            data = flat[pos:pos + step].tobytes()
            whole.update(data)
            parts.append(hashlib.sha256(data).hexdigest())
    return whole.hexdigest(), parts


def _stored_span(e: CheckpointEntry, itemsize: int) -> tuple[Path, int, int] | None:
    """(file, offset, length) of a tensor's elements when they lie in one file range, row-major."""
    item = e.chunks[0][2] if len(e.chunks) == 1 else None
    if item is None:
        return None
    if item.encoding in ("raw", ("raw",), ("pt", "contiguous")) and item.length == itemsize * numel(e.shape):
        return item.file, item.offset, item.length
    if item.encoding != ("torch.save", False):
        return None
    lazy = load_torch(item.file, f"{item.file} (item {item.key!r} at byte {item.offset})", (item.offset, item.length))
    if not isinstance(lazy, LazyTensor) or not lazy.is_contiguous():  # read in place: its directory and pickle
        return None
    offset, length = lazy.byte_span()
    return Path(lazy.storage.source), offset, length


def build_manifest(path: str | os.PathLike) -> dict[str, Any]:
    layout = load_layout(path)
    entries: dict[str, str] = {}
    chunks: dict[str, list[str]] = {}
    for e in sorted(layout.entries.values(), key=lambda e: e.order):
        if e.kind == "tensor":
            entries[e.name], chunks[e.name] = _tensor_digests(e)
        elif e.kind == "value":
            entries[e.name] = _digest_value(e.value)
        else:
            for key, value in flatten_values(e.chunks[0][2].decode(), e.name).items():
                entries[key] = _digest_value(value)
    for name, p in layout.side_files.items():
        entries[f"file:{name}"] = _digest_value(side_file_value(p))
    layers: dict[str, list[str]] = {}
    for key in sorted(entries):  # by name: independent of storage order
        m = _LAYER_RE.match(key)
        layers.setdefault(m.group(1) if m else key.split(".")[0], []).append(f"{key}={entries[key]};")
    return {"format": MANIFEST_FORMAT, "kind": layout.kind, "source": str(path), "entries": entries,
            "chunk_elements": MANIFEST_CHUNK_ELEMENTS, "chunks": chunks,
            "layers": {k: hashlib.sha256("".join(v).encode()).hexdigest() for k, v in layers.items()}}


def _checkpoint_dir(src: Path) -> Path:
    """The directory a checkpoint occupies: itself, or the directory holding a checkpoint file."""
    return src if src.is_dir() else src.parent


def write_manifest(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the manifest of `path` to `output` (default: beside the checkpoint, never inside it)."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    src = Path(path).resolve()
    home = _checkpoint_dir(src)
    if output:
        out = Path(output)
    elif src.is_dir():
        out = src.parent / f"{src.name}.manifest.json"
    else:
        out = home.parent / f"{home.name}.{src.name}.manifest.json"
    parent = out.parent.resolve()
    if parent == home or parent.is_relative_to(home):
        raise CheckpointError(f"{out}: the manifest must not be written inside the checkpoint {home} "
                              "(it would change what is compared); pass -o elsewhere")
    manifest = build_manifest(path)
    try:
        write_atomic(out, json.dumps(manifest, indent=1, sort_keys=True))
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write the manifest ({exc.strerror or exc})") from None
    return out
