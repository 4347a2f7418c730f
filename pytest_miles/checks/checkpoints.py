"""Bitwise checkpoint equality that looks at the weights and names the first divergence: the public
helpers (`compare_checkpoints`, `assert_checkpoints_equal`, manifests) in one place.

Where things are: checkpoint formats are read in ckpt/ (`load_layout`, manifests); the comparison
is decided in compare.py (native fast path, else layout_compare.py: byte streams, then values where
bytes differ); the report is compare_report.py; whole runs, iteration by iteration, iterations.py.
Nothing read is ever executed.
"""

from __future__ import annotations

import os
from typing import Any

from pytest_miles.checks.compare import compare_checkpoints
from pytest_miles.checks.compare_report import Difference, Report
from pytest_miles.checks.iterations import first_diverging_iteration
from pytest_miles.ckpt.manifest import MANIFEST_FORMAT, build_manifest, write_manifest
from pytest_miles.errors import CheckpointError
from pytest_miles.recording import recorded

__all__ = ["MANIFEST_FORMAT", "CheckpointError", "Difference", "Report", "assert_checkpoints_equal",
           "build_manifest", "compare_checkpoints", "write_manifest"]


@recorded("checkpoints equal")
def assert_checkpoints_equal(a: str | os.PathLike, b: str | os.PathLike, *, ignore: tuple[str, ...] | list[str] = (),
                             first: bool = False, iterations: str | None = None) -> Any:
    """Raise AssertionError with the full report unless every tensor and value is bitwise equal.

    iterations="all": a and b are run dirs; every iteration both saved must be equal (the
    report names the first diverging iteration and its first differing tensor)."""
    if iterations is not None:
        if iterations != "all":
            raise ValueError(f"iterations={iterations!r}: expected 'all' or None")
        walk = first_diverging_iteration(a, b, ignore=ignore)
        if not walk.passed:
            raise AssertionError(walk.render())
        return walk
    report = compare_checkpoints(a, b, ignore=ignore, first=first)
    if not report.passed:
        raise AssertionError(report.render())
    return report
