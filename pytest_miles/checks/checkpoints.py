"""Bitwise checkpoint equality that looks at the weights and names the first divergence.

How: entries are matched by name (a dict lookup each: O(n)), whatever file or shard holds them.
Where both sides store a tensor in the same chunk layout, its stored bytes are compared as
streams (adjacent items coalesced into one run, reads into two reused buffers), so memory stays
near a few buffers, not the checkpoint; bytes equal means values equal. Where the layouts differ
(TP 1 vs 2, replicated vs FSDP2-sharded) or bytes differ, both sides are assembled and decoded,
to say which elements differ and by how much. Container files whose bytes differ by design (DCP
`.metadata`: random save id, path) are compared semantically. Nothing read is ever executed.
"""

from __future__ import annotations

import fnmatch
import gc
import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pytest_miles._files import SafeFile, read_bytes, read_text
from pytest_miles.checks.compare_report import Difference, Report, merge_notes
from pytest_miles.ckpt.layouts import CheckpointError, Entry, Item, Layout, load_layout
from pytest_miles.ckpt.unpickle import LazyTensor, materialize
from pytest_miles.recording import recorded
from pytest_miles.report.collector import write_atomic

__all__ = ["CheckpointError", "Report", "assert_checkpoints_equal", "compare_checkpoints", "write_manifest"]

CHUNK = 2 * 2**20  # two of these per worker: stays in cache, measured faster than 8 MiB
LAYOUT_ONLY = "[layout only]"


# ---- streams -------------------------------------------------------------------------------


def _first_diff(fa: SafeFile, fb: SafeFile, oa: int, ob: int, length: int, bufs: tuple[bytearray, bytearray],
                stop: threading.Event) -> int | None:
    """Offset (from oa/ob) of the first CHUNK-aligned block that differs, None when all equal.
    Stops (returning None) as soon as `stop` is set by another worker under --first."""
    ba, bb = bufs
    pos = 0
    while pos < length:
        if stop.is_set():
            return None
        n = min(length - pos, CHUNK)
        va, vb = memoryview(ba)[:n], memoryview(bb)[:n]
        ra, rb = fa.preadinto(va, oa + pos), fb.preadinto(vb, ob + pos)
        if ra != n or rb != n:
            raise CheckpointError(f"{fa.path if ra != n else fb.path}: truncated (file shrank while reading)")
        if (ba != bb) if n == CHUNK else (ba[:n] != bb[:n]):  # bytearray ==: memcmp; memoryview ==: per element
            return pos
        pos += n
    return None


def _compare_group(pairs: list[tuple[Item, Item]], files: tuple[Path, Path], stop: threading.Event,
                   first: bool = False) -> tuple[int, int, list[tuple[Item, Item]]]:
    """Compare the byte ranges of items that live in one (file A, file B) pair, in file order.
    Items adjacent on both sides are one run: one read loop for thousands of small tensors.
    Returns (items compared, bytes compared on both sides, the pairs whose bytes differ)."""
    out: list[tuple[Item, Item]] = []
    count = nbytes = 0
    bufs = (bytearray(CHUNK), bytearray(CHUNK))
    with SafeFile(files[0]) as fa, SafeFile(files[1]) as fb:
        i, n = 0, len(pairs)
        while i < n and not stop.is_set():
            a, b = pairs[i]
            if a.length != b.length:
                out.append((a, b))
                count, nbytes, i = count + 1, nbytes + a.length + b.length, i + 1
                if first:
                    stop.set()
                continue
            j, end_a, end_b = i + 1, a.offset + a.length, b.offset + b.length
            while j < n:
                na, nb = pairs[j]
                if na.offset != end_a or nb.offset != end_b or na.length != nb.length:
                    break
                end_a, end_b = end_a + na.length, end_b + nb.length
                j += 1
            pos = _first_diff(fa, fb, a.offset, b.offset, end_a - a.offset, bufs, stop)
            if pos is None:
                if not stop.is_set():
                    count, nbytes = count + j - i, nbytes + 2 * (end_a - a.offset)
                i = j
                continue
            at = a.offset + pos  # items ending before the differing block are equal
            while i < j and pairs[i][0].offset + pairs[i][0].length <= at:
                count, nbytes, i = count + 1, nbytes + 2 * pairs[i][0].length, i + 1
            x, y = pairs[i]  # the item holding the differing block
            same = _first_diff(fa, fb, x.offset, y.offset, x.length, bufs, threading.Event()) is None
            count, nbytes, i = count + 1, nbytes + x.length + y.length, i + 1
            if not same:
                out.append((x, y))
                if first:
                    stop.set()  # --first: nothing after the first differing byte range is read
    return count, nbytes, out


def _split(pairs: list[tuple[Item, Item]], parts: int) -> list[list[tuple[Item, Item]]]:
    """One file pair's items (in file order) cut into about `parts` slices of similar byte size,
    so that one big file pair is read by every worker (reads release the GIL), not by one."""
    total = sum(a.length for a, _ in pairs)
    if parts < 2 or total < 4 * CHUNK * parts:
        return [pairs]
    out, cur, acc, step = [], [], 0, total / parts
    for p in pairs:
        cur.append(p)
        acc += p[0].length
        if acc >= step * (len(out) + 1) and len(out) < parts - 1:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


# ---- semantic comparison -------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested containers -> {key.path: leaf}, so that differences have a name."""
    from pytest_miles.ckpt.layouts import _flatten as flat

    out: dict[str, Any] = {}
    flat(materialize(obj), prefix, out)
    return out


def _is_tensor(x: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _leaf_diff(name: str, x: Any, y: Any) -> Difference | None:
    from pytest_miles.checks.bits import bits_equal, tensor_diff

    if isinstance(x, LazyTensor):
        x = x.materialize()
    if isinstance(y, LazyTensor):
        y = y.materialize()
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
        same = bool(x == y)
    except Exception:
        same = False
    if not same and hasattr(x, "__dict__") and hasattr(y, "__dict__"):
        sub = _objects_diff(name, vars(x), vars(y))
        return sub[0] if sub else None
    return None if same else Difference("object", name, f"{name}: {x!r:.120} vs {y!r:.120}")


def _objects_diff(name: str, x: Any, y: Any, ignore: Ignore | None = None) -> list[Difference]:
    fx, fy = _flatten(x, name), _flatten(y, name)
    diffs = []
    for key in dict.fromkeys([*fx, *fy]):
        if ignore is not None and ignore(key):
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


class Ignore:
    """--ignore globs, matched against the names the report prints; remembers which matched."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns, self.used = patterns, set()

    def __call__(self, name: str) -> bool:
        for p in self.patterns:
            if fnmatch.fnmatchcase(name, p):
                self.used.add(p)
                return True
        return False

    def unmatched(self) -> list[str]:
        return [p for p in self.patterns if p not in self.used]


def _side_file_value(path: Path) -> Any:
    text = read_bytes(path, what="side file")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


# ---- the comparison ------------------------------------------------------------------------


def _validate_workers(workers: int | None) -> int:
    if workers is None:
        return min(2, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CheckpointError(f"--workers {workers!r}: expected a whole number >= 1 (file pairs read in parallel)")
    return workers


def compare_checkpoints(a: str | os.PathLike, b: str | os.PathLike | dict, *, ignore: tuple[str, ...] | list[str] = (),
                        first: bool = False, workers: int | None = None, fast: bool = True) -> Report:
    """Compare two checkpoints (or one against a manifest file/dict) and return the report.

    Raises CheckpointError for unusable input. Never writes to either input. `fast`: first try the
    native path for two plain DCP dirs (dcp_fast.py), which only ever answers EQUAL (the same
    report) or hands over to the full comparison; False: the full comparison only.
    """
    nworkers = _validate_workers(workers)
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
    t0 = time.perf_counter()
    ign = Ignore(tuple(ignore))
    if isinstance(b, dict) or (str(b).endswith(".json") and _is_manifest(Path(b))):
        report = _compare_with_manifest(a, b, ign, t0)
        report.ignored_unmatched = ign.unmatched()
        return _something_compared(report, ign)
    la = load_layout(a)
    lb = load_layout(b, like=la)
    report = compare_layouts(la, lb, str(a), str(b), ign, first, nworkers)
    report.seconds = time.perf_counter() - t0
    return _something_compared(report, ign)


def _something_compared(report: Report, ign: Ignore) -> Report:
    """EQUAL over zero tensors and values would be a pass that tested nothing: unusable input."""
    if report.differences or report.tensors_compared:
        return report
    why = (f"every entry matched --ignore {' '.join(repr(p) for p in ign.patterns)}" if ign.used
           else "neither side holds a tensor or a value")
    raise CheckpointError(f"{report.a} vs {report.b}: nothing was compared ({why}); an EQUAL here would "
                          "say nothing about determinism")


def _same_geometry(ea: Entry, eb: Entry) -> bool:
    if len(ea.chunks) == 1 == len(eb.chunks):
        (oa, sa, ia), (ob, sb, ib) = ea.chunks[0], eb.chunks[0]
        return oa == ob and sa == sb and ia.encoding == ib.encoding
    return ea.geometry() == eb.geometry()


def _base_kind(kind: str) -> str:
    return "dcp" if kind.endswith("dcp") else "torch" if kind.endswith(("torch", "legacy")) else kind.split("/")[-1]


def compare_layouts(la: Layout, lb: Layout, a: str, b: str, ign: Ignore, first: bool, nworkers: int) -> Report:
    if _base_kind(la.kind) != _base_kind(lb.kind):
        raise CheckpointError(f"{a} is a {la.kind} checkpoint but {b} is {lb.kind}: compare like with like")
    report = Report(a, b, la.kind, lb.kind, ignored=list(ign.patterns))
    report.notes.extend(merge_notes(la.notes, lb.notes))
    diffs = report.differences
    pairs: dict[tuple[Path, Path], list[tuple[Item, Item]]] = {}
    owner: dict[int, tuple[Entry, Entry | None]] = {}  # None: B's entry is A's, relocated (mirrored)
    relocate = lb.relocate
    assembled: list[tuple[Entry, Entry]] = []
    assembled_ids: set[int] = set()
    relaid: list[str] = []
    moved: list[str] = []
    ignoring = bool(ign.patterns)
    mirrored: list[Entry] = []
    for name in dict.fromkeys([*la.entries, *lb.entries]):
        if ignoring and ign(name):
            continue
        ea, eb = la.entries.get(name), lb.entries.get(name)
        if ea is eb:  # B's .metadata mirrors A's: the same entry, read from B's files
            mirrored.append(ea)
        elif eb is None:
            diffs.append(Difference("missing", name, f"{name}: in A ({ea.where}) but not in B", ea.order))
        elif ea is None:
            diffs.append(Difference("extra", name, f"{name}: in B ({eb.where}) but not in A", eb.order))
        elif ea.kind != eb.kind:
            diffs.append(Difference("object", name, f"{name}: {ea.kind} vs {eb.kind}", ea.order))
        elif ea.kind == "value":
            d = _leaf_diff(name, ea.value, eb.value)
            if d is not None:
                d.order = ea.order
                diffs.append(d)
            report.tensors_compared += 1
        elif ea.dtype != eb.dtype:
            diffs.append(Difference("dtype", name, f"{name}: dtype {ea.dtype} vs {eb.dtype}", ea.order))
        elif ea.shape != eb.shape:
            diffs.append(Difference("shape", name, f"{name}: shape {list(ea.shape or ())} vs {list(eb.shape or ())}",
                                    ea.order))
        elif not _same_geometry(ea, eb):
            assembled.append((ea, eb))
            assembled_ids.add(id(ea))
            if [c[:2] for c in ea.chunks] != [c[:2] for c in eb.chunks]:
                relaid.append(name)
        else:
            for (_, _, ia), (_, _, ib) in zip(ea.chunks, eb.chunks):
                pairs.setdefault((ia.file, ib.file), []).append((ia, ib))
                owner[id(ia)] = (ea, eb)
                if ia.file.name != ib.file.name and len(la.entries) > 1:
                    moved.append(f"{ia.key} ({ia.file.name} vs {ib.file.name})")
    by_file: dict[int, list[tuple[Item, Item]]] = {}  # id(A's file): one Path object per file
    for ea in mirrored:
        for _, _, ia in ea.chunks:
            group = by_file.get(id(ia.file))
            if group is None:
                group = by_file[id(ia.file)] = pairs.setdefault((ia.file, relocate[ia.file]), [])
            group.append((ia, ia))
            owner[id(ia)] = (ea, None)
    if moved:
        report.notes.append(f"storage placement differs for {len(moved)} item(s), e.g. {moved[0]}: items are "
                            "compared by name, wherever they are stored")
    if relaid:
        report.notes.append(f"chunk layouts differed for {len(relaid)} tensor(s) (e.g. {relaid[0]}): those were "
                            "compared as assembled global tensors")

    reported = {d.name for d in diffs}  # per-tensor metadata of a tensor already reported adds nothing
    for key in dict.fromkeys([*la.meta, *lb.meta]):
        if ign(key):
            continue
        va, vb = la.meta.get(key, "<absent>"), lb.meta.get(key, "<absent>")
        if va != vb and key.split(":")[-1] not in reported:
            diffs.append(Difference("metadata", key, f"{key}: {_short(va)} vs {_short(vb)}"))
    files_a, files_b = la.layout_info.get("safetensors files", []), lb.layout_info.get("safetensors files", [])
    if files_a != files_b and max(len(files_a), len(files_b)) > 1:
        report.notes.append("safetensors shard files differ "
                            f"({', '.join(la.layout_info['safetensors files'])} vs "
                            f"{', '.join(lb.layout_info.get('safetensors files', []))}); tensors are compared by name")
    if la.layout_info.get("legacy ranks") != lb.layout_info.get("legacy ranks"):
        report.notes.append(f"legacy Megatron rank layout: {la.layout_info.get('legacy ranks')} vs "
                            f"{lb.layout_info.get('legacy ranks')}")

    stop = threading.Event()
    if first and diffs:
        stop.set()
    unequal: dict[int, tuple[Entry, Entry]] = {}
    if pairs and not stop.is_set():
        groups = []
        for files, group in pairs.items():
            group.sort(key=lambda p: p[0].offset)
            groups.extend((files, part) for part in _split(group, nworkers if len(pairs) < nworkers else 1))
        groups.sort(key=lambda g: min(p[0].order for p in g[1]))
        with ThreadPoolExecutor(max_workers=nworkers) as pool:
            futures = [pool.submit(_compare_group, group, files, stop, first) for files, group in groups]
            for fut in futures:
                count, nbytes, differing = fut.result()
                report.tensors_compared += count
                report.bytes_compared += nbytes
                for ia, _ in differing:
                    ea, eb = owner[id(ia)]
                    if eb is None:  # a mirrored entry: read B's bytes from B's files
                        from pytest_miles.ckpt.dcp_layout import relocated

                        eb = relocated(ea, relocate)
                    unequal[id(ea)] = (ea, eb)
    todo = sorted([*unequal.values(), *assembled], key=lambda p: p[0].order)
    for ea, eb in todo:
        if first and diffs:
            stop.set()
            break
        if ea.kind == "bytes":
            found = _objects_diff(ea.name, ea.chunks[0][2].decode(), eb.chunks[0][2].decode(), ign)
        else:
            d = _leaf_diff(ea.name, ea.assemble(), eb.assemble())
            found = [d] if d else []
            if id(ea) in assembled_ids:
                report.tensors_compared += 1
                report.bytes_compared += sum(it.length for *_, it in ea.chunks) + sum(it.length for *_, it in eb.chunks)
        for d in found:
            d.order = ea.order
        diffs.extend(found)
        if not found and id(ea) in unequal and ea.kind != "bytes":
            report.notes.append(f"{ea.name}: stored bytes differ but every value is bitwise equal")

    for name in dict.fromkeys([*la.side_files, *lb.side_files]):
        if ign(name) or (first and diffs):
            continue
        pa, pb = la.side_files.get(name), lb.side_files.get(name)
        if pb is None:
            diffs.append(Difference("missing", name, f"file {name}: in A but not in B"))
        elif pa is None:
            diffs.append(Difference("extra", name, f"file {name}: in B but not in A"))
        else:
            diffs.extend(Difference("file", d.name, f"file {d.detail}") for d in
                         _objects_diff(name, _side_file_value(pa), _side_file_value(pb), ign))
    report.stopped_early = first and bool(diffs) and stop.is_set()
    report.ignored_unmatched = ign.unmatched()
    return report


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 160 else text[:157] + "..."


@recorded("checkpoints equal")
def assert_checkpoints_equal(a: str | os.PathLike, b: str | os.PathLike, *, ignore: tuple[str, ...] | list[str] = (),
                             first: bool = False, iterations: str | None = None) -> Any:
    """Raise AssertionError with the full report unless every tensor and value is bitwise equal.

    iterations="all": a and b are run dirs; every iteration both saved must be equal (the
    report names the first diverging iteration and its first differing tensor)."""
    if iterations is not None:
        from pytest_miles.checks.iterations import first_diverging_iteration

        if iterations != "all":
            raise ValueError(f"iterations={iterations!r}: expected 'all' or None")
        walk = first_diverging_iteration(a, b, ignore=ignore)
        if not walk.equal:
            raise AssertionError(walk.render())
        return walk
    report = compare_checkpoints(a, b, ignore=ignore, first=first)
    if not report.equal:
        raise AssertionError(report.render())
    return report


# ---- manifests -----------------------------------------------------------------------------

MANIFEST_FORMAT = "pytest-miles/checkpoint-manifest/2"
_MANIFEST_FORMATS = ("pytest-miles/checkpoint-manifest/1", MANIFEST_FORMAT)
MANIFEST_CHUNK_ELEMENTS = 2**20
_LAYER_RE = __import__("re").compile(r"^(.*?\blayers\.\d+)\.")


def _is_manifest(path: Path) -> bool:
    try:
        head = read_bytes(path, limit=2**30, what="manifest")
        return json.loads(head).get("format") in _MANIFEST_FORMATS
    except (CheckpointError, ValueError, AttributeError):
        return False


def _digest_value(v: Any) -> str:
    h = hashlib.sha256()
    if isinstance(v, LazyTensor):
        v = v.materialize()
    if _is_tensor(v):
        import torch

        t = v.detach().contiguous().cpu()
        h.update(f"{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(v).encode())
    return h.hexdigest()


def _tensor_digests(e: Entry) -> tuple[str, list[str]]:
    """(digest of the whole tensor, digests of each MANIFEST_CHUNK_ELEMENTS-element range).
    A tensor stored as one raw chunk is streamed from the file; others are assembled first."""
    from pytest_miles.ckpt.layouts import ITEMSIZE

    itemsize = ITEMSIZE[e.dtype or "uint8"]
    whole = hashlib.sha256(f"torch.{e.dtype}|{list(e.shape or ())}|".encode())
    parts: list[str] = []
    step = MANIFEST_CHUNK_ELEMENTS * itemsize
    item = e.chunks[0][2] if len(e.chunks) == 1 else None
    if item is not None and item.encoding in ("raw", ("raw",), ("pt", "contiguous")) and item.length == \
            itemsize * _numel(e.shape):
        with SafeFile(item.file) as f:
            for pos in range(0, item.length, step):
                data = f.pread(item.offset + pos, min(step, item.length - pos), f"tensor {e.name!r}")
                whole.update(data)
                parts.append(hashlib.sha256(data).hexdigest())
    elif item is not None and item.encoding == ("torch.save", False) and (lazy := _lazy_chunk(item)) is not None:
        raw = memoryview(lazy.read())
        for pos in range(0, len(raw), step):
            data = raw[pos:pos + step]
            whole.update(data)
            parts.append(hashlib.sha256(data).hexdigest())
    else:
        import torch

        flat = e.assemble().contiguous().reshape(-1).view(torch.uint8).numpy()
        for pos in range(0, len(flat), step):
            data = flat[pos:pos + step].tobytes()
            whole.update(data)
            parts.append(hashlib.sha256(data).hexdigest())
    return whole.hexdigest(), parts


def _lazy_chunk(item: Item) -> LazyTensor | None:
    """A DCP tensor chunk (a torch.save blob) read without torch, when it is one contiguous tensor."""
    from pytest_miles.ckpt.unpickle import load_torch

    with SafeFile(item.file) as f:
        blob = f.pread(item.offset, item.length, f"item {item.key!r}")
    obj = load_torch(blob, f"{item.file} (item {item.key!r} at byte {item.offset})")
    return obj if isinstance(obj, LazyTensor) and obj.is_contiguous() else None


def _numel(shape: Any) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n


def build_manifest(path: str | os.PathLike) -> dict[str, Any]:
    layout = load_layout(path)
    entries: dict[str, str] = {}
    chunks: dict[str, list[str]] = {}
    for e in sorted(layout.entries.values(), key=lambda e: e.order):
        if e.kind == "tensor":
            entries[e.name], chunks[e.name] = _tensor_digests(e)
        elif e.kind == "value":
            entries[e.name] = _digest_value(e.value)
        else:
            for key, value in _flatten(e.chunks[0][2].decode(), e.name).items():
                entries[key] = _digest_value(value)
    for name, p in layout.side_files.items():
        entries[f"file:{name}"] = _digest_value(_side_file_value(p))
    layers: dict[str, list[str]] = {}
    for key in sorted(entries):  # by name: independent of storage order
        m = _LAYER_RE.match(key)
        layers.setdefault(m.group(1) if m else key.split(".")[0], []).append(f"{key}={entries[key]};")
    return {"format": MANIFEST_FORMAT, "kind": layout.kind, "source": str(path), "entries": entries,
            "chunk_elements": MANIFEST_CHUNK_ELEMENTS, "chunks": chunks,
            "layers": {k: hashlib.sha256("".join(v).encode()).hexdigest() for k, v in layers.items()}}


def _checkpoint_dir(src: Path) -> Path:
    """The directory a checkpoint occupies: itself, or the directory holding a checkpoint file."""
    return src if src.is_dir() else src.parent


def write_manifest(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the manifest of `path` to `output` (default: beside the checkpoint, never inside it)."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    src = Path(path).resolve()
    home = _checkpoint_dir(src)
    if output:
        out = Path(output)
    elif src.is_dir():
        out = src.parent / f"{src.name}.manifest.json"
    else:
        out = home.parent / f"{home.name}.{src.name}.manifest.json"
    parent = out.parent.resolve()
    if parent == home or parent.is_relative_to(home):
        raise CheckpointError(f"{out}: the manifest must not be written inside the checkpoint {home} "
                              "(it would change what is compared); pass -o elsewhere")
    manifest = build_manifest(path)
    try:
        write_atomic(out, json.dumps(manifest, indent=1, sort_keys=True))
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write the manifest ({exc.strerror or exc})") from None
    return out


def _compare_with_manifest(a, b, ignore: Ignore, t0: float) -> Report:
    if isinstance(b, dict):
        manifest = b
    else:
        try:
            manifest = json.loads(read_text(b, limit=2**30, what="manifest"))
        except ValueError as exc:
            raise CheckpointError(f"{b}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in _MANIFEST_FORMATS or not isinstance(
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
