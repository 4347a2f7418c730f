"""Which checkpoint a path is, and what it holds: the one entry point of ckpt/ (`load_layout`).

Formats: Megatron save dirs (`latest_checkpointed_iteration.txt` -> `iter_XXXXXXX/`, torch_dist or
legacy `mp_rank_NN[_PPP]/model_optim_rng.pt`), torch DCP dirs (`*.distcp` + `.metadata`),
safetensors files and HF dirs (sharded, with an index json), and `.pt` files or dirs of them.
Every file is opened through SafeFile (regular files only, bounded reads) and every pickle through
the restricted unpickler (nothing called). Every error names the file and is a `CheckpointError`.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from pytest_miles._files import SafeFile, read_text
from pytest_miles.ckpt.dcp_layout import dcp_layout
from pytest_miles.ckpt.megatron_legacy import legacy_megatron_layout
from pytest_miles.ckpt.model import (
    ITER_RE,
    MP_RANK_RE,
    SIDE_SUFFIXES,
    TORCH_SUFFIXES,
    CheckpointError,
    Layout,
    is_regular,
    listdir,
    resolve_path,
)
from pytest_miles.ckpt.safetensors import hf_layout
from pytest_miles.ckpt.torch_files import add_torch_file, torch_files_layout

__all__ = ["CheckpointError", "Layout", "load_layout", "megatron_iteration_dir"]


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
    p = resolve_path(Path(path))
    if not p.is_dir():
        SafeFile(p).close()  # regular file or a clear refusal (FIFO, socket, device)
        if p.suffix == ".safetensors":
            return hf_layout(p.parent, [p])
        if p.name.endswith(".safetensors.index.json"):
            return hf_layout(p.parent)
        if p.suffix in TORCH_SUFFIXES:
            return torch_files_layout(p.parent, [p], single=True)
        raise CheckpointError(f"{p}: not a checkpoint file (expected .safetensors, .pt, .pth or .bin)")
    it = megatron_iteration_dir(p)
    if it is not None:
        layout = _load_layout(it, like)
        layout.kind = f"megatron/{layout.kind}" if not layout.kind.startswith("megatron") else layout.kind
        layout.notes.append(f"{p.name}/latest_checkpointed_iteration.txt -> {it.name}")
        return layout
    entries = listdir(p)
    names = {e.name for e in entries}
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        if ".metadata" not in names:
            raise CheckpointError(f"{p}: has .distcp files but no .metadata")
        layout = dcp_layout(p, "dcp", entries, like)
        order = len(layout.entries)
        for e in entries:  # Megatron's common.pt and metadata.json beside the DCP files
            if e.suffix in TORCH_SUFFIXES and not e.is_dir():
                order = add_torch_file(layout, e, f"{e.name}:", order)
            elif is_regular(e) and e.suffix in SIDE_SUFFIXES:
                layout.side_files[e.name] = e
        return layout
    if any(n.endswith(".safetensors") for n in names):
        return hf_layout(p)
    ranks = [e for e in entries if e.is_dir() and MP_RANK_RE.search(e.name)]
    if ranks:
        return legacy_megatron_layout(p, ranks)
    pts = [e for e in entries if e.suffix in TORCH_SUFFIXES and not e.is_dir()]
    if pts:
        layout = torch_files_layout(p, pts)
        for e in entries:
            if is_regular(e) and e.suffix in SIDE_SUFFIXES:
                layout.side_files[e.name] = e
        return layout
    iters = sorted(e for e in entries if e.is_dir() and ITER_RE.search(e.name))
    hint = f" (it has {iters[-1].name}/ but no latest_checkpointed_iteration.txt)" if iters else ""
    raise CheckpointError(f"{p}: no checkpoint found (no .metadata/.distcp, .safetensors, .pt files or "
                          f"mp_rank_* dirs){hint}")
