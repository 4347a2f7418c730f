"""Two checkpoint layouts compared entry by entry, by name (a dict lookup each: O(n)), whatever file
or shard holds them.

Where both sides store a tensor in the same chunk layout, its stored bytes are compared as streams
(byte_ranges.py); where the layouts differ (TP 1 vs 2, replicated vs FSDP2-sharded) or bytes differ,
both sides are assembled and decoded, to say which elements differ and by how much. Container files
whose bytes differ by design (DCP `.metadata`: random save id, path) are compared semantically.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.checks.byte_ranges import compare_group, split
from pytest_miles.checks.compare_report import Difference, Report, merge_notes
from pytest_miles.checks.element_diff import element_diff, element_first
from pytest_miles.checks.values import Ignore, leaf_diff, objects_diff
from pytest_miles.ckpt.dcp_layout import relocated
from pytest_miles.ckpt.model import CheckpointEntry, CheckpointError, Item, Layout, side_file_value
from pytest_miles.ckpt.native import native_reader

__all__ = ["compare_layouts"]

Pairs = dict[tuple[Path, Path], list[tuple[Item, Item]]]


@dataclass
class _Plan:
    """What the entry match decided: byte ranges to stream, entries to assemble, notes."""

    pairs: Pairs = field(default_factory=dict)
    owner: dict[int, tuple[CheckpointEntry, CheckpointEntry | None]] = field(default_factory=dict)  # None: mirrored
    assembled: list[tuple[CheckpointEntry, CheckpointEntry]] = field(default_factory=list)
    assembled_ids: set[int] = field(default_factory=set)
    relaid: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    mirrored: list[CheckpointEntry] = field(default_factory=list)


def _same_geometry(ea: CheckpointEntry, eb: CheckpointEntry) -> bool:
    if len(ea.chunks) == 1 == len(eb.chunks):
        (oa, sa, ia), (ob, sb, ib) = ea.chunks[0], eb.chunks[0]
        return oa == ob and sa == sb and ia.encoding == ib.encoding
    return ea.geometry() == eb.geometry()


def _base_kind(kind: str) -> str:
    return "dcp" if kind.endswith("dcp") else "torch" if kind.endswith(("torch", "legacy")) else kind.split("/")[-1]


def _entry_diff(name: str, ea: CheckpointEntry | None, eb: CheckpointEntry | None) -> Difference | None:
    """What differs before any byte is read: presence, kind, dtype, shape."""
    if eb is None:
        return Difference("missing", name, f"{name}: in A ({ea.where}) but not in B", ea.order)
    if ea is None:
        return Difference("extra", name, f"{name}: in B ({eb.where}) but not in A", eb.order)
    if ea.kind != eb.kind:
        return Difference("object", name, f"{name}: {ea.kind} vs {eb.kind}", ea.order)
    if ea.kind != "value" and ea.dtype != eb.dtype:
        return Difference("dtype", name, f"{name}: dtype {ea.dtype} vs {eb.dtype}", ea.order)
    if ea.kind != "value" and ea.shape != eb.shape:
        return Difference("shape", name, f"{name}: shape {list(ea.shape or ())} vs {list(eb.shape or ())}", ea.order)
    return None


def _match(la: Layout, lb: Layout, ign: Ignore, report: Report) -> _Plan:
    """Entries matched by name: differences of presence/kind/dtype/shape and of values now; tensors
    planned as byte ranges to stream (same geometry) or as entries to assemble (other geometry)."""
    plan, diffs, ignoring = _Plan(), report.differences, bool(ign.patterns)
    for name in dict.fromkeys([*la.entries, *lb.entries]):
        if ignoring and ign(name):
            continue
        ea, eb = la.entries.get(name), lb.entries.get(name)
        if ea is eb:  # B's .metadata mirrors A's: the same entry, read from B's files
            plan.mirrored.append(ea)
            continue
        d = _entry_diff(name, ea, eb)
        if d is not None:
            diffs.append(d)
        elif ea.kind == "value":
            d = leaf_diff(name, ea.value, eb.value)
            if d is not None:
                d.order = ea.order
                diffs.append(d)
            report.tensors_compared += 1
        elif not _same_geometry(ea, eb):
            plan.assembled.append((ea, eb))
            plan.assembled_ids.add(id(ea))
            if [c[:2] for c in ea.chunks] != [c[:2] for c in eb.chunks]:
                plan.relaid.append(name)
        else:
            for (_, _, ia), (_, _, ib) in zip(ea.chunks, eb.chunks):
                plan.pairs.setdefault((ia.file, ib.file), []).append((ia, ib))
                plan.owner[id(ia)] = (ea, eb)
                if ia.file.name != ib.file.name and len(la.entries) > 1:
                    plan.moved.append(f"{ia.key} ({ia.file.name} vs {ib.file.name})")
    by_file: dict[int, list[tuple[Item, Item]]] = {}  # id(A's file): one Path object per file
    for ea in plan.mirrored:
        for _, _, ia in ea.chunks:
            group = by_file.get(id(ia.file))
            if group is None:
                group = by_file[id(ia.file)] = plan.pairs.setdefault((ia.file, lb.relocate[ia.file]), [])
            group.append((ia, ia))
            plan.owner[id(ia)] = (ea, None)
    return plan


def _layout_notes(la: Layout, lb: Layout, plan: _Plan, ign: Ignore, report: Report) -> None:
    """Notes on how the two are stored, and the differences of their compared metadata."""
    if plan.moved:
        report.notes.append(f"storage placement differs for {len(plan.moved)} item(s), e.g. {plan.moved[0]}: items "
                            "are compared by name, wherever they are stored")
    if plan.relaid:
        report.notes.append(f"chunk layouts differed for {len(plan.relaid)} tensor(s) (e.g. {plan.relaid[0]}): those "
                            "were compared as assembled global tensors")
    diffs = report.differences
    reported = {d.name for d in diffs}  # per-tensor metadata of a tensor already reported adds nothing
    for key in dict.fromkeys([*la.meta, *lb.meta]):
        if ign(key):
            continue
        va, vb = la.meta.get(key, "<absent>"), lb.meta.get(key, "<absent>")
        if va != vb and key.split(":")[-1] not in reported:
            diffs.append(Difference("metadata", key, f"{key}: {_short(va)} vs {_short(vb)}"))
    files_a, files_b = la.layout_info.get("safetensors files", []), lb.layout_info.get("safetensors files", [])
    if files_a != files_b and max(len(files_a), len(files_b)) > 1:
        report.notes.append(f"safetensors shard files differ ({', '.join(files_a)} vs {', '.join(files_b)}); "
                            "tensors are compared by name")
    if la.layout_info.get("legacy ranks") != lb.layout_info.get("legacy ranks"):
        report.notes.append(f"legacy Megatron rank layout: {la.layout_info.get('legacy ranks')} vs "
                            f"{lb.layout_info.get('legacy ranks')}")


def _in_threads(fn: Any, calls: list[tuple], nworkers: int) -> list[tuple[bool, Any]]:
    """(True, fn(*args)) or (False, the exception) for every args of `calls`, in their order, run on
    `nworkers` threads taking the calls in order: what a ThreadPoolExecutor gave here, without
    importing concurrent.futures (it imports logging: ~5 ms of `compare`'s start-up)."""
    out: list[tuple[bool, Any]] = [(False, None)] * len(calls)
    take = itertools.count().__next__  # atomic under the GIL

    def work() -> None:
        while (i := take()) < len(calls):
            try:
                out[i] = (True, fn(*calls[i]))
            except BaseException as exc:  # noqa: BLE001  (handed to the caller, as Future.result() did)
                out[i] = (False, exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(nworkers, len(calls)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _stream(plan: _Plan, relocate: dict[Path, Path], report: Report, nworkers: int, first: bool,
            stop: threading.Event) -> dict[int, tuple[CheckpointEntry, CheckpointEntry]]:
    """Stream every planned byte range (file pairs in parallel); the entries whose bytes differ."""
    unequal: dict[int, tuple[CheckpointEntry, CheckpointEntry]] = {}
    if not plan.pairs or stop.is_set():
        return unequal
    groups = []
    for files, group in plan.pairs.items():
        group.sort(key=lambda p: p[0].offset)
        groups.extend((files, part) for part in split(group, nworkers if len(plan.pairs) < nworkers else 1))
    groups.sort(key=lambda g: min(p[0].order for p in g[1]))
    for ok, got in _in_threads(compare_group, [(group, files, stop, first) for files, group in groups], nworkers):
        if not ok:
            raise got
        count, nbytes, differing = got
        report.tensors_compared += count
        report.bytes_compared += nbytes
        for ia, _ in differing:
            ea, eb = plan.owner[id(ia)]
            unequal[id(ea)] = (ea, eb if eb is not None else relocated(ea, relocate))  # mirrored: B's files
    return unequal


def _decode(plan: _Plan, unequal: dict[int, tuple[CheckpointEntry, CheckpointEntry]], ign: Ignore, report: Report,
            first: bool, stop: threading.Event) -> None:
    """Values of the entries whose bytes differ or whose layouts differ: which elements, how much."""
    diffs = report.differences
    native = native_reader() if unequal else None
    for ea, eb in sorted([*unequal.values(), *plan.assembled], key=lambda p: p[0].order):
        if first and diffs:
            stop.set()
            break
        if ea.kind == "bytes":
            found = objects_diff(ea.name, ea.chunks[0][2].decode(), eb.chunks[0][2].decode(), ign)
        else:
            td = None
            if id(ea) in unequal:  # without torch where it can; --first: the first differing element alone
                td = (element_first if first else element_diff)(native, ea, eb)
            d = Difference("tensor", ea.name, td.render(), data=td.to_json()) if td is not None else leaf_diff(
                ea.name, ea.assemble(), eb.assemble(), first)
            found = [d] if d else []
            if id(ea) in plan.assembled_ids:
                report.tensors_compared += 1
                report.bytes_compared += sum(it.length for *_, it in ea.chunks) + sum(it.length for *_, it in eb.chunks)
        for d in found:
            d.order = ea.order
        diffs.extend(found)
        if not found and id(ea) in unequal and ea.kind != "bytes":
            report.notes.append(f"{ea.name}: stored bytes differ but every value is bitwise equal")


def _side_files(la: Layout, lb: Layout, ign: Ignore, report: Report, first: bool) -> None:
    diffs = report.differences
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
                         objects_diff(name, side_file_value(pa), side_file_value(pb), ign))


def compare_layouts(la: Layout, lb: Layout, a: str, b: str, ign: Ignore, first: bool, nworkers: int) -> Report:
    """The report of two layouts: entries matched, bytes streamed, differing values decoded."""
    if _base_kind(la.kind) != _base_kind(lb.kind):
        raise CheckpointError(f"{a} is a {la.kind} checkpoint but {b} is {lb.kind}: compare like with like")
    report = Report(a, b, la.kind, lb.kind, ignored=list(ign.patterns))
    report.notes.extend(merge_notes(la.notes, lb.notes))
    plan = _match(la, lb, ign, report)
    _layout_notes(la, lb, plan, ign, report)
    stop = threading.Event()
    if first and report.differences:
        stop.set()
    unequal = _stream(plan, lb.relocate, report, nworkers, first, stop)
    _decode(plan, unequal, ign, report, first, stop)
    _side_files(la, lb, ign, report, first)
    report.stopped_early = first and bool(report.differences) and stop.is_set()
    report.ignored_unmatched = ign.unmatched()
    return report


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 160 else text[:157] + "..."
