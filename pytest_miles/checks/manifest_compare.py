"""A checkpoint compared with a manifest (its digests, written earlier or elsewhere): which entries
are missing, extra or differ, and for a differing tensor its first differing chunk of elements.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pytest_miles._files import read_text
from pytest_miles.checks.compare_report import Difference, Report
from pytest_miles.checks.values import Ignore
from pytest_miles.ckpt.manifest import MANIFEST_CHUNK_ELEMENTS, MANIFEST_FORMATS, build_manifest
from pytest_miles.ckpt.model import CheckpointError

__all__ = ["compare_with_manifest"]


def compare_with_manifest(a: Any, b: Any, ignore: Ignore, t0: float) -> Report:
    if isinstance(b, dict):
        manifest = b
    else:
        try:
            manifest = json.loads(read_text(b, limit=2**30, what="manifest"))
        except ValueError as exc:
            raise CheckpointError(f"{b}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in MANIFEST_FORMATS or not isinstance(
            manifest.get("entries"), dict):
        raise CheckpointError(f"{b}: not a pytest-miles checkpoint manifest")
    mine = build_manifest(a)
    report = Report(str(a), str(b), mine["kind"], f"manifest of {manifest.get('kind')}", ignored=list(ignore.patterns))
    theirs = manifest["entries"]
    their_chunks = manifest.get("chunks") or {}
    step = int(manifest.get("chunk_elements") or MANIFEST_CHUNK_ELEMENTS)
    for order, key in enumerate(dict.fromkeys([*mine["entries"], *theirs])):
        if ignore(key):
            continue
        da, db = mine["entries"].get(key), theirs.get(key)
        if db is None:
            report.differences.append(Difference("missing", key, f"{key}: in A but not in the manifest", order))
        elif da is None:
            report.differences.append(Difference("extra", key, f"{key}: in the manifest but not in A", order))
        elif da != db:
            where = ""
            ca, cb = mine["chunks"].get(key), their_chunks.get(key)
            if ca and isinstance(cb, list) and step == MANIFEST_CHUNK_ELEMENTS:
                i = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
                where = f"; first differing chunk {i}: elements [{i * step}, {(i + 1) * step}) of the flattened tensor"
            report.differences.append(Difference("tensor", key, f"{key}: digest {da[:16]} vs {db[:16]}{where} "
                                                 "(values not available from a manifest)", order,
                                                 data={"chunk": i, "elements": [i * step, (i + 1) * step]}
                                                 if where else None))
        report.tensors_compared += 1
    bad_layers = sorted(k for k, v in mine["layers"].items() if manifest.get("layers", {}).get(k) != v)
    if bad_layers:
        report.notes.append(f"layers whose digest differs: {', '.join(bad_layers[:20])}")
    report.seconds = time.perf_counter() - t0
    return report
