"""`compare_checkpoints`: the one place that decides how two checkpoints are compared.

First the native fast path (dcp_fast.py) where it may answer (no --ignore, not a manifest), then the
full comparison (layout_compare.py), imported only when needed: `pytest-miles compare` calls this
too, and process start is part of what users wait for.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

from pytest_miles.checks.compare_report import Report
from pytest_miles.errors import CheckpointError

__all__ = ["compare_checkpoints", "validate_workers"]


def validate_workers(workers: int | None) -> int:
    if workers is None:
        return min(2, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CheckpointError(f"--workers {workers!r}: expected a whole number >= 1 (file pairs read in parallel)")
    return workers


def compare_checkpoints(a: str | os.PathLike, b: str | os.PathLike | dict, *, ignore: tuple[str, ...] | list[str] = (),
                        first: bool = False, workers: int | None = None, fast: bool = True) -> Report:
    """Compare two checkpoints (or one against a manifest file/dict) and return the report.

    Raises CheckpointError for unusable input. Never writes to either input. `fast`: first try the
    native path for two DCP dirs, plain or Megatron torch_dist (dcp_fast.py), which only ever
    answers EQUAL (the same report) or hands over to the full comparison; False: the full
    comparison only."""
    nworkers = validate_workers(workers)
    if str(a).endswith(".json") and _is_manifest(Path(a)):
        raise CheckpointError(f"{a}: a checkpoint manifest is read as the second argument only: compare "
                              f"CHECKPOINT {a}, with the checkpoint first")
    if fast and not ignore and not isinstance(b, dict):
        from pytest_miles.checks.dcp_fast import fast_equal

        report = fast_equal(a, b, nworkers)
        if report is not None:
            return report
    was = gc.isenabled()
    gc.disable()  # 100,000s of small objects for 20,000 tensors: no repeated full collections
    try:
        return _compare_checkpoints(a, b, ignore, first, nworkers)
    finally:
        if was:
            gc.enable()


def _compare_checkpoints(a: Any, b: Any, ignore: Any, first: bool, nworkers: int) -> Report:
    from pytest_miles.checks.layout_compare import compare_layouts
    from pytest_miles.checks.values import Ignore
    from pytest_miles.ckpt.layouts import load_layout

    t0 = time.perf_counter()
    ign = Ignore(tuple(ignore))
    if isinstance(b, dict) or (str(b).endswith(".json") and _is_manifest(Path(b))):
        from pytest_miles.checks.manifest_compare import compare_with_manifest

        report = compare_with_manifest(a, b, ign, t0)
        report.ignored_unmatched = ign.unmatched()
        return _something_compared(report, ign)
    la = load_layout(a)
    lb = load_layout(b, like=la)
    report = compare_layouts(la, lb, str(a), str(b), ign, first, nworkers)
    report.seconds = time.perf_counter() - t0
    return _something_compared(report, ign)


def _is_manifest(path: Path) -> bool:
    from pytest_miles.ckpt.manifest import is_manifest  # hashlib and the manifest writer: only for a .json

    return is_manifest(path)


def _something_compared(report: Report, ign: Any) -> Report:
    """EQUAL over zero tensors and values would be a pass that tested nothing: unusable input."""
    if report.differences or report.tensors_compared:
        return report
    why = (f"every entry matched --ignore {' '.join(repr(p) for p in ign.patterns)}" if ign.used
           else "neither side holds a tensor or a value")
    raise CheckpointError(f"{report.a} vs {report.b}: nothing was compared ({why}); an EQUAL here would "
                          "say nothing about determinism")
