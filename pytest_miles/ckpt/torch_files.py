"""`torch.save` files (`.pt`, `.pth`, `.bin`) and dirs of them: every leaf of each file's nested
containers is an entry named by its path (`file.pt:model.layers.0.weight`), tensors as their byte
ranges in the file (read through the restricted unpickler: nothing in the file runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_miles.ckpt.lazy import LazyTensor
from pytest_miles.ckpt.model import CheckpointEntry, Item, Layout, flatten
from pytest_miles.ckpt.torch_save import load_torch

__all__ = ["add_torch_file", "torch_files_layout"]


def add_torch_file(layout: Layout, path: Path, prefix: str, order: int) -> int:
    obj = load_torch(path)
    flat: dict[str, Any] = {}
    flatten(obj, "", flat)
    leaves = {(prefix + k if k else prefix.rstrip(":") or "(root)"): v for k, v in flat.items()}
    for name, value in leaves.items():
        if isinstance(value, LazyTensor):
            off, length = value.byte_span()
            t = value

            def decode(t=t):
                return t.materialize()

            enc = ("pt", value.stride if not value.is_contiguous() else "contiguous")
            item = Item(name, path, off, length, order, "tensor", enc, decode)
            entry = CheckpointEntry(name, order, "tensor", value.dtype, tuple(value.size),
                                    [((0,) * len(value.size), tuple(value.size), item)], where=path.name)
        else:
            entry = CheckpointEntry(name, order, "value", value=value, where=path.name)
        layout.add(entry, path)
        order += 1
    return order


def torch_files_layout(root: Path, files: list[Path], kind: str = "torch", single: bool = False) -> Layout:
    layout = Layout(kind, root)
    order = 0
    for path in files:
        rel = path.name if path.parent == root else str(path.relative_to(root))
        order = add_torch_file(layout, path, "" if single else f"{rel}:", order)
    return layout
