"""Megatron-LM's non-distributed checkpoints: `iter_XXXXXXX/mp_rank_NN[_PPP]/model_optim_rng.pt`,
one `torch.save` file per tensor- and pipeline-parallel rank, read as torch files."""

from __future__ import annotations

from pathlib import Path

from pytest_miles.ckpt.model import MP_RANK_RE, TORCH_SUFFIXES, CheckpointError, Layout, listdir
from pytest_miles.ckpt.torch_files import torch_files_layout

__all__ = ["legacy_megatron_layout"]


def legacy_megatron_layout(root: Path, ranks: list[Path]) -> Layout:
    """iter_XXXXXXX/mp_rank_NN[_PPP]/model_optim_rng.pt (Megatron-LM's non-distributed format)."""
    files = []
    for d in ranks:
        pts = [p for p in listdir(d) if p.suffix in TORCH_SUFFIXES]
        if not pts:
            raise CheckpointError(f"{d}: legacy Megatron rank dir without a .pt file")
        files.extend(pts)
    layout = torch_files_layout(root, files, "megatron-legacy")
    tp = sorted({MP_RANK_RE.search(d.name).group(1) for d in ranks})
    pp = sorted({MP_RANK_RE.search(d.name).group(2) or "000" for d in ranks})
    layout.layout_info["legacy ranks"] = f"{len(tp)} tensor-parallel x {len(pp)} pipeline ranks"
    return layout
