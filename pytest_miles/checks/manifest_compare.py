"""A checkpoint compared with a manifest (its digests, written earlier or elsewhere): which entries
are missing, extra or differ, and for a differing tensor its first differing chunk of elements.
"""

from __future__ import annotations

import time
from typing import Any

from pytest_miles._files import load_json
from pytest_miles.checks.compare_report import Difference, Report
from pytest_miles.checks.values import Ignore
from pytest_miles.ckpt.manifest import MANIFEST_CHUNK_ELEMENTS, MANIFEST_FORMATS, build_manifest
from pytest_miles.ckpt.model import CheckpointError

__all__ = ["compare_with_manifest"]


def _checked(manifest: Any, where: Any) -> dict:
    """A manifest's fields with the types this comparison reads, or a CheckpointError naming the field."""
    accepted = "a pytest-miles checkpoint manifest (written by `pytest-miles manifest`)"
    if not isinstance(manifest, dict) or manifest.get("format") not in MANIFEST_FORMATS or not isinstance(
            manifest.get("entries"), dict):
        raise CheckpointError(f"{where}: not {accepted}")
    bad = next((k for k, v in manifest["entries"].items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{where}: entry {bad!r}: digest must be a string; expected {accepted}")
    chunks = manifest.get("chunks", {})
    if not isinstance(chunks, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                               for v in chunks.values()):
        raise CheckpointError(f"{where}: field 'chunks' must map names to lists of digests; expected {accepted}")
    step = manifest.get("chunk_elements", MANIFEST_CHUNK_ELEMENTS)
    if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= 2**62:
        raise CheckpointError(f"{where}: field 'chunk_elements' must be a positive integer, got {step!r}")
    layers = manifest.get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(v, str) for v in layers.values()):
        raise CheckpointError(f"{where}: field 'layers' must map layer names to digests; expected {accepted}")
    kind = manifest.get("kind", "")
    if not isinstance(kind, str):
        raise CheckpointError(f"{where}: field 'kind' must be a string, got {type(kind).__name__}")
    return {**manifest, "chunks": chunks, "chunk_elements": step, "layers": layers, "kind": kind}


def compare_with_manifest(a: Any, b: Any, ignore: Ignore, t0: float) -> Report:
    if isinstance(b, dict):
        manifest = b
    else:
        manifest = load_json(b, "manifest", limit=2**30, error=CheckpointError)
    manifest = _checked(manifest, b if not isinstance(b, dict) else "manifest")
    mine = build_manifest(a)
    report = Report(str(a), str(b), mine["kind"], f"manifest of {manifest.get('kind')}", ignored=list(ignore.patterns))
    theirs = manifest["entries"]
    their_chunks = manifest["chunks"]
    step = manifest["chunk_elements"]
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
    bad_layers = sorted(k for k, v in mine["layers"].items() if manifest["layers"].get(k) != v)
    if bad_layers:
        report.notes.append(f"layers whose digest differs: {', '.join(bad_layers[:20])}")
    report.seconds = time.perf_counter() - t0
    return report
