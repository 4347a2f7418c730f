"""What each stack promises, as data: per SGLang version range x attention backend x mode (and
condition), batch invariance is *promised* (a hard check), a *known limitation* (an xfail naming
its upstream reference), or *not applicable* (a skip with the reason). The packaged file is
`sglang.toml` beside this module; a user file (--miles-capabilities) is read first and wins.

Versions are compared with `packaging` (a dependency of pytest itself, so always present where
pytest-miles is): `versions` is a PEP 440 specifier set, e.g. ">=0.5.17,<0.5.24".
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.capabilities.deterministic_mode import (
    Applies,
    check_read_from,
    in_versions,
    read_applies,
    string_list,
)
from pytest_miles.errors import CapabilityError  # noqa: F401  (importable here too)

STATUSES = ("promised", "known_limitation", "not_applicable")
MODES = ("single", "prefix", "prefix_long_anchor", "radix_cache", "p_vs_d", "needle")
# What a cell's `modes` may name: the batch-invariance modes, and the checks outside them that consult
# the same data (the cache-path check uses radix_cache's cells; api_surfaces: the same request on every
# API surface; min_p_with_seed: a min-p request to a deterministic server, which samples with a seed;
# mixed_sampling: a seeded request beside a batchmate that filters; serve: whether the server starts at all;
# decode_kv: the cache-path check's second turn, served over KV that the first turn's decode wrote;
# chunked_prefill: the traffic check's requests whose prompt is longer than the prefill chunk).
CHECKS = (*MODES, "api_surfaces", "min_p_with_seed", "mixed_sampling", "serve", "decode_kv", "chunked_prefill",
          "retraction", "prefill_under_traffic")
SHAPE_KEYS = ("seed", "max_batch", "prompt_len", "min_seq_len", "model_shape")
CELL_FIELDS = ("id", "versions", "backends", "modes", "status", "condition", "reason", "references", "verified",
               "reproduces", "read_from")
SGLANG_KINDS = ("sglang", "sglang-offline")
PACKAGED = Path(__file__).with_name("sglang.toml")


@dataclass(frozen=True)
class Cell:
    """One [[cell]] of a capability file (not facts.precision.PrecisionCell, a low-precision table cell)."""

    id: str
    versions: str
    backends: tuple[str, ...]
    modes: tuple[str, ...]
    status: str
    condition: str = ""
    reason: str = ""
    references: tuple[str, ...] = ()
    verified: str = ""
    reproduces: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    read_from: tuple[str, ...] = ()  # "VERSION sglang/PATH.py:LINE" of the released source it was read from

    def matches(self, backend: str, mode: str, version: str | None) -> bool:
        if "*" not in self.backends and backend not in self.backends:
            return False
        if "*" not in self.modes and mode not in self.modes:
            return False
        if not self.versions:
            return True
        return version is not None and in_versions(self.versions, version)  # dev builds count

    def reproduced_by(self, shape: dict[str, Any]) -> bool:
        """Whether a check of this shape reproduces the limitation (then a pass is XPASS(strict))."""
        for key, want in self.reproduces.items():
            got = shape.get(key.removeprefix("min_") if key == "min_seq_len" else key)
            if key == "min_seq_len":
                if got is None or got < want:
                    return False
            elif got not in (want if isinstance(want, list) else [want]):
                return False
        return True


@dataclass(frozen=True)
class Capability:
    """The verdict rule for one check: its status, the cell it came from, and strictness."""

    status: str
    cell: Cell | None = None
    strict: bool = True
    where: str = ""  # engine/backend/version, for messages

    @property
    def known(self) -> bool:
        return self.status == "known_limitation"

    def describe(self) -> str:
        if self.cell is None:
            return f"{self.status} ({self.where}: no capability cell matches; treated as promised)"
        c = self.cell
        refs = "; ".join(c.references)
        text = f"{self.status} [{c.id}] on {self.where}"
        if c.condition:
            text += f" when {c.condition}"
        if c.reason:
            text += f": {c.reason}"
        if refs:
            text += f" (see {refs})"
        if not c.verified:
            text += " [as documented upstream, unverified here]"
        return text


PROMISED = Capability("promised")


def _cell(raw: Any, index: int, path: str) -> Cell:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    where = f"{path}: [[cell]] #{index + 1}"
    if not isinstance(raw, dict):
        raise CapabilityError(f"{where}: expected a table")
    if "id" in raw:
        where += f" ({raw['id']!r})"
    unknown = sorted(set(raw) - set(CELL_FIELDS))
    if unknown:
        raise CapabilityError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(CELL_FIELDS)})")
    for name in ("id", "status", "modes", "backends"):
        if name not in raw:
            raise CapabilityError(f"{where}: field '{name}' is missing")
    status = raw["status"]
    if status not in STATUSES:
        raise CapabilityError(f"{where}: field 'status': {status!r} is not one of {', '.join(STATUSES)}")
    versions = raw.get("versions", "")
    if not isinstance(versions, str):
        raise CapabilityError(f"{where}: field 'versions': expected a PEP 440 specifier string, got {versions!r}")
    try:
        SpecifierSet(versions)
    except InvalidSpecifier:
        raise CapabilityError(f"{where}: field 'versions': {versions!r} is not a version specifier "
                              "(PEP 440, e.g. '>=0.5.17,<0.5.24'; '' for every version)") from None
    modes = string_list(raw["modes"], f"{where}: field 'modes'")
    bad = [m for m in modes if m != "*" and m not in CHECKS]
    if bad:
        raise CapabilityError(f"{where}: field 'modes': {bad[0]!r} is not one of {', '.join(CHECKS)} or '*'")
    backends = string_list(raw["backends"], f"{where}: field 'backends'")
    refs = string_list(raw.get("references", []), f"{where}: field 'references'") if raw.get("references") else ()
    for name in ("condition", "reason"):
        if not isinstance(raw.get(name, ""), str):
            raise CapabilityError(f"{where}: field '{name}': expected a string")
    if status != "promised" and not raw.get("reason"):
        raise CapabilityError(f"{where}: field 'reason' is required for status {status!r}")
    if status == "known_limitation" and not refs:
        raise CapabilityError(f"{where}: field 'references' is required for a known_limitation (the upstream issue)")
    verified = raw.get("verified", "")
    if not isinstance(verified, (str, bool)):
        raise CapabilityError(f"{where}: field 'verified': expected a string (where it was seen) or false")
    reproduces = raw.get("reproduces", {})
    if not isinstance(reproduces, dict):
        raise CapabilityError(f"{where}: field 'reproduces': expected a table")
    bad = sorted(set(reproduces) - set(SHAPE_KEYS))
    if bad:
        raise CapabilityError(f"{where}: field 'reproduces': unknown key(s) {', '.join(bad)} "
                              f"(known: {', '.join(SHAPE_KEYS)})")
    read_from = check_read_from(raw.get("read_from", []), where, versions)
    if read_from and verified is True:
        raise CapabilityError(f"{where}: field 'verified': true with 'read_from': say where it ran on a GPU, or false "
                              "(read from the released source only)")
    return Cell(str(raw["id"]), versions, backends, modes, status, raw.get("condition", ""), raw.get("reason", ""),
                refs, "" if verified is False else ("yes" if verified is True else verified), dict(reproduces), path,
                read_from)


def read_file(path: str | Path) -> tuple[list[Cell], bool]:
    """Cells of one file, and whether it extends the packaged data ([meta] extends, default true)."""
    cells, extends, _ = read_all(path)
    return cells, extends


def read_all(path: str | Path) -> tuple[list[Cell], bool, list[Applies]]:
    """Cells, extends, and the [[applies]] tables (what deterministic mode sets) of one file."""
    from pytest_miles._files import load_toml

    path = str(path)
    data = load_toml(path, "capability file (a TOML file of [meta] and [[cell]] tables)", error=CapabilityError)
    unknown = sorted(set(data) - {"meta", "cell", "applies"})
    if unknown:
        raise CapabilityError(f"{path}: unknown table(s) {', '.join(unknown)} (known: [meta], [[cell]], [[applies]])")
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise CapabilityError(f"{path}: [meta] must be a table")
    if meta.get("schema", 1) != 1:
        raise CapabilityError(f"{path}: [meta] field 'schema': {meta['schema']!r} is not supported (this is schema 1)")
    if meta.get("engine", "sglang") != "sglang":
        raise CapabilityError(f"{path}: [meta] field 'engine': {meta['engine']!r}: only 'sglang' is known")
    extends = meta.get("extends", True)
    if not isinstance(extends, bool):
        raise CapabilityError(f"{path}: [meta] field 'extends': expected true or false, got {extends!r}")
    raw_cells = data.get("cell", [])
    if not isinstance(raw_cells, list):
        raise CapabilityError(f"{path}: 'cell' must be an array of tables ([[cell]])")
    cells = [_cell(c, i, path) for i, c in enumerate(raw_cells)]
    seen: set[str] = set()
    for c in cells:
        if c.id in seen:
            raise CapabilityError(f"{path}: field 'id': {c.id!r} is used by two cells")
        seen.add(c.id)
    return cells, extends, read_applies(data, path)


@dataclass
class Capabilities:
    cells: list[Cell]
    sources: list[str]
    applies: list[Applies] = field(default_factory=list)  # what deterministic mode sets (user's first)

    def lookup(self, backend: str, mode: str, version: str | None, shape: dict[str, Any] | None = None,
               engine: str = "sglang") -> Capability:
        """The rule for `mode` on this backend and SGLang version (promised when no cell matches)."""
        where = f"{engine}/{backend} {version or '(version unknown)'}"
        for cell in self.cells:
            if cell.matches(backend, mode, version):
                strict = cell.reproduced_by(shape or {}) if cell.status == "known_limitation" else True
                return Capability(cell.status, cell, strict, where)
        return Capability("promised", None, True, where)


_CACHE: dict[str | None, Capabilities] = {}


def load_capabilities(user: str | Path | None = None) -> Capabilities:
    """The packaged cells, after the user's file (whose cells win; `[meta] extends = false` drops ours)."""
    key = None if user is None else str(user)
    if key not in _CACHE:
        cells: list[Cell] = []
        sources: list[str] = []
        applies: list[Applies] = []
        extends = True
        if user is not None:
            cells, extends, applies = read_all(user)
            sources.append(str(user))
        if extends:
            more, _, more_applies = read_all(PACKAGED)
            cells, applies = cells + more, applies + more_applies
            sources.append(str(PACKAGED))
        _CACHE[key] = Capabilities(cells, sources, applies)
    return _CACHE[key]


def installed_sglang_version() -> str | None:
    """From the package metadata: no import of sglang."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


BACKENDS = ("flashinfer", "triton", "fa3", "fa4")


def table_rows(caps: Capabilities, version: str | None, backends: tuple[str, ...] = BACKENDS
               ) -> list[tuple[str, str, Capability]]:
    """(backend, check, rule) for every batch mode, and for every other check (traffic, caches,
    sampling features, ...) where a cell says something of it, per backend."""
    rows = []
    for backend in backends:
        for mode in CHECKS:
            cap = caps.lookup(backend, mode, version) if version else _any_version(caps, backend, mode)
            if mode in MODES or cap.cell is not None:
                rows.append((backend, mode, cap))
    return rows


def render_table(caps: Capabilities, version: str | None, backends: tuple[str, ...] = BACKENDS) -> list[str]:
    """One line per backend x mode for this SGLang version, and per other check a cell speaks of
    (the `pytest-miles capabilities` table)."""
    lines = [f"SGLang {version or 'not installed (rows as for any version)'}; "
             f"capability data: {', '.join(caps.sources)}"]
    lines.append(f"{'backend':11} {'check':21} {'status':17} cell / condition / reference")
    for backend, mode, cap in table_rows(caps, version, backends):
        if cap.cell is None:
            detail = "(no cell: treated as promised)"
        else:
            c = cap.cell
            detail = f"[{c.id}] {c.condition}"
            if c.references:
                detail += f" -- {c.references[0]}"
            if not c.verified:
                detail += " (unverified)"
        lines.append(f"{backend:11} {mode:21} {cap.status:17} {detail}")
    return lines


def _any_version(caps: Capabilities, backend: str, mode: str) -> Capability:
    for cell in caps.cells:
        if ("*" in cell.backends or backend in cell.backends) and ("*" in cell.modes or mode in cell.modes):
            return Capability(cell.status, cell, True, backend)
    return Capability("promised", None, True, backend)
