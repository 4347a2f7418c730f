"""Fixtures shared by the checkpoint tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def parallel_layouts(tmp_path_factory) -> Path:
    """One launch of 2 gloo ranks writing the same weights in several layouts (`save_parallel_layouts`):
    read by test_checkpoints_layouts and, through `dcp_pairs`, by test_dcp_native and test_front, none of
    which changes them (they check that). Each of the three launched its own before (about 11 s each)."""
    from tests.helpers.checkpoints import save_parallel_layouts

    return save_parallel_layouts(tmp_path_factory.mktemp("parallel") / "layouts")


@pytest.fixture(scope="session")
def dcp_pairs(tmp_path_factory, parallel_layouts) -> dict[str, tuple[Path, Path]]:
    """Equal pairs of real saves, each side written by its own save (its own save_id and path): world 1
    (plain, AdamW state, 2,000 small tensors) and world 2 over gloo (two .distcp files, chunked tensors).
    test_dcp_native and test_front read them and never change them (they check that); one build per
    pytest process (each xdist worker that needs them), not one per module (about 14 s each on a
    2-core machine)."""
    torch = pytest.importorskip("torch")
    from tests.helpers.checkpoints import make_state, optimizer_state, save_dcp

    t = tmp_path_factory.mktemp("dcp-pairs")
    pairs = {}
    for side in ("a", "b"):
        save_dcp(t / f"plain-{side}", make_state(0))
        save_dcp(t / f"adamw-{side}", optimizer_state(0))
        many = {f"model.layers.{i // 10}.p{i % 10}": torch.full((1 + i % 7,), float(i)) for i in range(2000)}
        save_dcp(t / f"many-{side}", many)
    for name in ("plain", "adamw", "many"):
        pairs[name] = (t / f"{name}-a", t / f"{name}-b")
    for name in ("fsdp2-sharded", "dtensor-replicated"):
        shutil.copytree(parallel_layouts / name, t / f"{name}-copy")
        pairs[name] = (parallel_layouts / name, t / f"{name}-copy")
    return pairs
