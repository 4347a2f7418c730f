"""Bitwise checkpoint equality that looks at the weights and names the first divergence.

How: every tensor's stored bytes are compared as streams (chunked reads into reused buffers,
files in parallel), so memory stays near a few buffers, not the checkpoint. Bytes equal means
the values are equal. Only where bytes differ are both sides decoded, to say which elements
differ and by how much (or that only the container differed). Container files whose bytes
differ by design (DCP `.metadata`: random save id, path) are compared semantically.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recording import recorded
from .layouts import CheckpointError, Item, load_layout

__all__ = ["CheckpointError", "Report", "assert_checkpoints_equal", "compare_checkpoints", "write_manifest"]

CHUNK = 8 * 2**20
LAYOUT_ONLY = "[layout only]"


@dataclass
class Difference:
    kind: str  # tensor | missing | extra | dtype | shape | metadata | object | file
    name: str
    detail: str
    order: int = 1 << 62
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail, **({"diff": self.data} if self.data else {})}


@dataclass
class Report:
    a: str
    b: str
    kind_a: str
    kind_b: str
    tensors_compared: int = 0
    bytes_compared: int = 0
    seconds: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def equal(self) -> bool:
        return not self.differences

    @property
    def first(self) -> Difference | None:
        return min(self.differences, key=lambda d: d.order) if self.differences else None

    def render(self) -> str:
        rate = self.bytes_compared / self.seconds / 1e9 if self.seconds else 0.0
        head = "EQUAL" if self.equal else f"DIFFERENT ({len(self.differences)} difference(s))"
        lines = [f"checkpoints {head}", f"  A: {self.a} [{self.kind_a}]", f"  B: {self.b} [{self.kind_b}]",
                 f"  compared {self.tensors_compared} items, {self.bytes_compared / 2**20:.1f} MiB in "
                 f"{self.seconds:.2f} s ({rate:.2f} GB/s)"]
        if self.first is not None:
            lines.append(f"  first difference in checkpoint order: {self.first.name}")
        for d in sorted(self.differences, key=lambda d: d.order):
            lines.append(f"  - [{d.kind}] {d.detail}")
        if self.stopped_early:
            lines.append("  (stopped at the first difference: --first)")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.ignored:
            lines.append(f"  ignored by request: {', '.join(self.ignored)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "equal": self.equal, "a": self.a, "b": self.b, "kind_a": self.kind_a, "kind_b": self.kind_b,
            "tensors_compared": self.tensors_compared, "bytes_compared": self.bytes_compared,
            "seconds": self.seconds, "first_difference": self.first.name if self.first else None,
            "differences": [d.to_json() for d in sorted(self.differences, key=lambda d: d.order)],
            "notes": self.notes, "ignored": self.ignored, "stopped_early": self.stopped_early,
        }


# ---- streams -------------------------------------------------------------------------------


def _ranges_equal(fa, fb, a: Item, b: Item, bufs: tuple[bytearray, bytearray]) -> bool:
    if a.length != b.length:
        return False
    fa.seek(a.offset)
    fb.seek(b.offset)
    left = a.length
    ba, bb = bufs
    while left:
        n = min(left, CHUNK)
        if n == CHUNK:
            ra, rb = fa.readinto(ba), fb.readinto(bb)
            if ra != n or rb != n:
                raise CheckpointError(f"{a.file if ra != n else b.file}: truncated while reading {a.key!r}")
            if ba != bb:
                return False
        else:
            da, db = fa.read(n), fb.read(n)
            if len(da) != n or len(db) != n:
                raise CheckpointError(f"{a.file if len(da) != n else b.file}: truncated while reading {a.key!r}")
            if da != db:
                return False
        left -= n
    return True


def _compare_group(pairs: list[tuple[Item, Item]], stop: threading.Event) -> list[tuple[Item, Item, bool]]:
    """Compare the byte ranges of items that live in one (file A, file B) pair, in file order."""
    out = []
    bufs = (bytearray(CHUNK), bytearray(CHUNK))
    fa_path, fb_path = pairs[0][0].file, pairs[0][1].file
    try:
        with open(fa_path, "rb", buffering=0) as fa, open(fb_path, "rb", buffering=0) as fb:
            for a, b in sorted(pairs, key=lambda p: p[0].offset):
                if stop.is_set():
                    break
                out.append((a, b, _ranges_equal(fa, fb, a, b, bufs)))
    except PermissionError as exc:
        raise CheckpointError(f"{exc.filename}: not readable (permission denied)") from None
    return out


# ---- semantic comparison -------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested containers -> {key.path: leaf}, so that differences have a name."""
    import argparse

    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: type(obj)()}
    return {prefix: obj}


def _is_tensor(x: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _leaf_diff(name: str, x: Any, y: Any) -> Difference | None:
    from .bits import bits_equal, tensor_diff

    if _is_tensor(x) or _is_tensor(y):
        if not (_is_tensor(x) and _is_tensor(y)):
            return Difference("object", name, f"{name}: tensor on one side only ({type(x).__name__} vs {type(y).__name__})")
        if x.dtype != y.dtype:
            return Difference("dtype", name, f"{name}: dtype {x.dtype} vs {y.dtype}")
        if tuple(x.shape) != tuple(y.shape):
            return Difference("shape", name, f"{name}: shape {list(x.shape)} vs {list(y.shape)}")
        if bits_equal(x, y):
            return None
        d = tensor_diff(name, x, y)
        return Difference("tensor", name, d.render(), data=d.to_json())
    np = __import__("sys").modules.get("numpy")
    if np is not None and (isinstance(x, np.ndarray) or isinstance(y, np.ndarray)):
        same = (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                and x.shape == y.shape and x.tobytes() == y.tobytes())
        return None if same else Difference("object", name, f"{name}: numpy arrays differ")
    if type(x) is not type(y):
        return Difference("object", name, f"{name}: {type(x).__name__} {x!r:.80} vs {type(y).__name__} {y!r:.80}")
    if isinstance(x, float):
        if math.isnan(x) and math.isnan(y) or x.hex() == y.hex():
            return None
        return Difference("object", name, f"{name}: {x!r} vs {y!r}")
    try:
        same = x == y
        same = bool(same)
    except Exception:
        same = False
    if not same and hasattr(x, "__dict__") and hasattr(y, "__dict__"):
        sub = _objects_diff(name, vars(x), vars(y))
        return sub[0] if sub else None
    return None if same else Difference("object", name, f"{name}: {x!r:.120} vs {y!r:.120}")


def _objects_diff(name: str, x: Any, y: Any, ignore: tuple[str, ...] = ()) -> list[Difference]:
    fx, fy = _flatten(x, name), _flatten(y, name)
    diffs = []
    for key in dict.fromkeys([*fx, *fy]):
        if _ignored(key, ignore):
            continue
        if key not in fy:
            diffs.append(Difference("missing", key, f"{key}: only in A"))
        elif key not in fx:
            diffs.append(Difference("extra", key, f"{key}: only in B"))
        else:
            d = _leaf_diff(key, fx[key], fy[key])
            if d is not None:
                diffs.append(d)
    return diffs


def _ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _side_file_value(path: Path) -> Any:
    text = path.read_bytes()
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


# ---- the comparison ------------------------------------------------------------------------


def compare_checkpoints(a: str | os.PathLike, b: str | os.PathLike | dict, *, ignore: tuple[str, ...] | list[str] = (),
                        first: bool = False, workers: int | None = None) -> Report:
    """Compare two checkpoints (or one against a manifest file/dict) and return the report.

    Raises CheckpointError for unusable input. Never writes to either input.
    """
    t0 = time.perf_counter()
    ignore = tuple(ignore)
    if isinstance(b, dict) or (not isinstance(b, dict) and str(b).endswith(".json") and Path(b).is_file()
                               and _is_manifest(Path(b))):
        return _compare_with_manifest(a, b, ignore, t0)
    la, lb = load_layout(a), load_layout(b)
    base_a, base_b = la.kind.split("/")[-1], lb.kind.split("/")[-1]
    if base_a != base_b:
        raise CheckpointError(f"{a} is a {la.kind} checkpoint but {b} is {lb.kind}: compare like with like")
    report = Report(str(a), str(b), la.kind, lb.kind, ignored=list(ignore))
    report.notes.extend(n if n in lb.notes else f"A: {n}" for n in la.notes)
    report.notes.extend(f"B: {n}" for n in lb.notes if n not in la.notes)
    diffs = report.differences

    pairs: dict[tuple[Path, Path], list[tuple[Item, Item]]] = {}
    for key in dict.fromkeys([*la.items, *lb.items]):
        if _ignored(key, ignore):
            continue
        ia, ib = la.items.get(key), lb.items.get(key)
        if ib is None:
            diffs.append(Difference("missing", key, f"{key}: in A ({ia.file.name}) but not in B", ia.order))
        elif ia is None:
            diffs.append(Difference("extra", key, f"{key}: in B ({ib.file.name}) but not in A", ib.order))
        elif ia.dtype != ib.dtype and ia.dtype and ib.dtype:
            diffs.append(Difference("dtype", key, f"{key}: dtype {ia.dtype} vs {ib.dtype}", ia.order))
        elif ia.shape != ib.shape and ia.kind == "tensor":
            diffs.append(Difference("shape", key, f"{key}: shape {list(ia.shape or ())} vs {list(ib.shape or ())}", ia.order))
        else:
            pairs.setdefault((ia.file, ib.file), []).append((ia, ib))

    # Per-tensor metadata of tensors already reported (missing, extra, dtype, shape) adds nothing.
    reported = {d.name for d in diffs}
    for key in dict.fromkeys([*la.meta, *lb.meta]):
        if _ignored(key, ignore):
            continue
        va, vb = la.meta.get(key, "<absent>"), lb.meta.get(key, "<absent>")
        fqn = key.split(":")[-1]
        if va != vb and fqn not in reported:
            if LAYOUT_ONLY in key:
                report.notes.append(f"{key} differs; tensors are compared by name, wherever they are stored")
            else:
                diffs.append(Difference("metadata", key, f"{key}: {_short(va)} vs {_short(vb)}"))

    stop = threading.Event()
    if first and diffs:
        stop.set()
    nworkers = workers or min(8, max(2, os.cpu_count() or 2))
    unequal: list[tuple[Item, Item]] = []
    with ThreadPoolExecutor(max_workers=nworkers) as pool:
        futures = [pool.submit(_compare_group, group, stop) for group in pairs.values()]
        for fut in futures:
            for ia, ib, same in fut.result():
                report.tensors_compared += 1
                report.bytes_compared += ia.length + ib.length
                if not same:
                    unequal.append((ia, ib))
                    if first:
                        stop.set()
    for ia, ib in sorted(unequal, key=lambda p: p[0].order):
        va, vb = ia.decode(), ib.decode()
        found = _objects_diff(ia.key, va, vb, ignore) if ia.kind != "tensor" else (
            [d] if (d := _leaf_diff(ia.key, va, vb)) else [])
        for d in found:
            d.order = ia.order
        diffs.extend(found)
        if not found:
            report.notes.append(f"{ia.key}: stored bytes differ but every value is bitwise equal")
        if first and diffs:
            break

    for name in dict.fromkeys([*la.side_files, *lb.side_files]):
        if _ignored(name, ignore):
            continue
        pa, pb = la.side_files.get(name), lb.side_files.get(name)
        if pb is None:
            diffs.append(Difference("missing", name, f"file {name}: in A but not in B"))
        elif pa is None:
            diffs.append(Difference("extra", name, f"file {name}: in B but not in A"))
        else:
            diffs.extend(Difference("file", d.name, f"file {d.detail}") for d in
                         _objects_diff(name, _side_file_value(pa), _side_file_value(pb), ignore))
    report.stopped_early = first and bool(diffs) and stop.is_set()
    report.seconds = time.perf_counter() - t0
    return report


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 160 else text[:157] + "..."


@recorded("checkpoints equal")
def assert_checkpoints_equal(a: str | os.PathLike, b: str | os.PathLike, *, ignore: tuple[str, ...] | list[str] = (),
                             first: bool = False) -> Report:
    """Raise AssertionError with the full report unless every tensor and value is bitwise equal."""
    report = compare_checkpoints(a, b, ignore=ignore, first=first)
    if not report.equal:
        raise AssertionError(report.render())
    return report


# ---- manifests -----------------------------------------------------------------------------

MANIFEST_FORMAT = "pytest-miles/checkpoint-manifest/1"
_LAYER_RE = __import__("re").compile(r"^(.*?\blayers\.\d+)\.")


def _is_manifest(path: Path) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _digest_value(v: Any) -> str:
    h = hashlib.sha256()
    if _is_tensor(v):
        import torch

        t = v.detach().contiguous().cpu()
        h.update(f"{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(v).encode())
    return h.hexdigest()


def _leaves(item: Item) -> dict[str, Any]:
    value = item.decode()
    return {item.key: value} if item.kind == "tensor" else _flatten(value, item.key)


def build_manifest(path: str | os.PathLike) -> dict[str, Any]:
    layout = load_layout(path)
    entries: dict[str, str] = {}
    for item in sorted(layout.items.values(), key=lambda i: i.order):
        for key, value in _leaves(item).items():
            entries[key] = _digest_value(value)
    for name, p in layout.side_files.items():
        entries[f"file:{name}"] = _digest_value(_side_file_value(p))
    layers: dict[str, hashlib._Hash] = {}
    for key, digest in entries.items():
        m = _LAYER_RE.match(key)
        layer = m.group(1) if m else key.split(".")[0]
        layers.setdefault(layer, hashlib.sha256()).update(f"{key}={digest};".encode())
    return {"format": MANIFEST_FORMAT, "kind": layout.kind, "source": str(path), "entries": entries,
            "layers": {k: h.hexdigest() for k, h in layers.items()}}


def write_manifest(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    manifest = build_manifest(path)
    src = Path(path).resolve()
    out = Path(output) if output else src.parent / f"{src.name}.manifest.json"
    if out.resolve().is_relative_to(src) if src.is_dir() else False:
        raise CheckpointError(f"{out}: the manifest must not be written inside the checkpoint {src}")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out)
    return out


def _compare_with_manifest(a, b, ignore: tuple[str, ...], t0: float) -> Report:
    if isinstance(b, dict):
        manifest = b
    else:
        try:
            manifest = json.loads(Path(b).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{b}: unreadable manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("entries"), dict):
        raise CheckpointError(f"{b}: not a pytest-miles checkpoint manifest")
    mine = build_manifest(a)
    report = Report(str(a), str(b), mine["kind"], f"manifest of {manifest.get('kind')}", ignored=list(ignore))
    theirs = manifest["entries"]
    for order, key in enumerate(dict.fromkeys([*mine["entries"], *theirs])):
        if _ignored(key, ignore):
            continue
        da, db = mine["entries"].get(key), theirs.get(key)
        if db is None:
            report.differences.append(Difference("missing", key, f"{key}: in A but not in the manifest", order))
        elif da is None:
            report.differences.append(Difference("extra", key, f"{key}: in the manifest but not in A", order))
        elif da != db:
            report.differences.append(Difference("tensor", key, f"{key}: digest {da[:16]} vs {db[:16]} "
                                                 "(values not available from a manifest)", order))
        report.tensors_compared += 1
    bad_layers = [k for k, v in mine["layers"].items() if manifest.get("layers", {}).get(k) != v]
    if bad_layers:
        report.notes.append(f"layers whose digest differs: {', '.join(bad_layers[:20])}")
    report.seconds = time.perf_counter() - t0
    return report
