"""One embedded model directory per shape per session, shared by pytest-xdist workers: the first
worker writes it (to a temporary directory, renamed into place) under a file lock; the others
wait for the lock and reuse it. The qwen2.5-0.5b shape is ~1 GB, so it must not be written twice."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pytest_miles._xdist import is_worker


def shared_root(basetemp: Path) -> Path:
    """The root of pytest's basetemp: under xdist each worker's basetemp is a child of it."""
    return basetemp.parent if is_worker() else basetemp


def cached_shape_dir(basetemp: Path, shape: str) -> Path:
    from filelock import FileLock

    from pytest_miles.models.shapes import SHAPES, write_shape

    if shape not in SHAPES:
        raise ValueError(f"--miles-model-shape: {shape!r} is not one of {', '.join(SHAPES)}")
    root = shared_root(Path(basetemp))
    final = root / f"miles-model-{shape}"
    if (final / "config.json").exists():
        return final
    with FileLock(str(root / f".miles-model-{shape}.lock")):
        if (final / "config.json").exists():
            return final
        tmp = root / f".miles-model-{shape}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_shape(tmp, shape)
        os.replace(tmp, final)
    return final
