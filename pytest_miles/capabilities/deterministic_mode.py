"""What SGLang's `--enable-deterministic-inference` changes, forces or refuses, per version, as data
read from the released sources (the `[[applies]]` tables of sglang.toml), and the doctor's
explanation of them for one SGLang version and attention backend.

Each `[[applies]]` table says: for these versions and backends, when this holds (`when`), the
server sets these things (`sets`), for this reason (`why`), read from these lines of the released
wheel (`read_from`: "VERSION sglang/PATH.py:LINE"), citing these upstream references. `verified`
says where pytest-miles ran it on a GPU ("" / false: read from the source only, unverified).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pytest_miles.errors import CapabilityError

FEATURES = ("attention_backend", "attention_kernel", "batch_invariant_ops", "sampling", "radix_cache",
            "chunked_prefill", "cuda_graph", "overlap_schedule", "tp_allreduce", "api_seed")
APPLIES_FIELDS = ("id", "versions", "backends", "feature", "when", "sets", "why", "read_from", "references",
                  "verified")
READ_FROM = re.compile(r"^(?P<version>\d+\.\d+\.\d+(?:\.post\d+)?) (?P<path>sglang/[\w/.]+\.py):(?P<line>[1-9]\d*)$")
READ_FROM_FORM = "'VERSION sglang/PATH.py:LINE', e.g. '0.5.23 sglang/srt/arg_groups/attention_hook.py:676'"


def string_list(value: Any, where: str) -> tuple[str, ...]:
    """A string or a list of strings, as a tuple; else CapabilityError naming `where`."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise CapabilityError(f"{where}: expected a string or a list of strings, got {value!r}")


def in_versions(versions: str, version: str) -> bool:
    """Whether `version` is in the PEP 440 range `versions` (dev and pre-release builds count); an
    unparsable version is in no range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(versions).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def check_read_from(value: Any, where: str, versions: str) -> tuple[str, ...]:
    """`read_from` entries: each names a released version the entry's `versions` admit, a file of
    that wheel and a line. Raises CapabilityError naming `where` and the entry."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CapabilityError(f"{where}: field 'read_from': expected a list of strings {READ_FROM_FORM}")
    spec = SpecifierSet(versions)
    for entry in value:
        m = READ_FROM.match(entry)
        if m is None:
            raise CapabilityError(f"{where}: field 'read_from': {entry!r} is not {READ_FROM_FORM}")
        if versions and not spec.contains(Version(m["version"]), prereleases=True):
            raise CapabilityError(f"{where}: field 'read_from': {entry!r} names version {m['version']}, outside "
                                  f"this entry's versions {versions!r}")
    return tuple(value)


@dataclass(frozen=True)
class Applies:
    """One [[applies]] table: a setting SGLang's deterministic mode applies (or leaves alone)."""

    id: str
    versions: str
    backends: tuple[str, ...]
    feature: str
    when: str
    sets: tuple[str, ...]
    why: str
    read_from: tuple[str, ...]
    references: tuple[str, ...]
    verified: str

    def matches(self, version: str, backend: str | None) -> bool:
        if backend and "*" not in self.backends and backend not in self.backends:
            return False
        return not self.versions or in_versions(self.versions, version)

    def source_for(self, version: str) -> str:
        """The read_from line of this version, else the nearest one read (said so)."""
        exact = [r for r in self.read_from if r.split(" ", 1)[0] == version]
        if exact:
            return exact[0].split(" ", 1)[1]
        return f"{self.read_from[-1]} (nearest version read)" if self.read_from else ""


def _strings(raw: dict, name: str, where: str, required: bool = True) -> tuple[str, ...]:
    value = string_list(raw.get(name, []), f"{where}: field '{name}'")
    if required and not value:
        raise CapabilityError(f"{where}: field '{name}' is missing or empty")
    return tuple(value)


def parse_applies(raw: Any, index: int, path: str) -> Applies:
    """One [[applies]] table, validated; CapabilityError names the file, the table and the field."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    where = f"{path}: [[applies]] #{index + 1}"
    if not isinstance(raw, dict):
        raise CapabilityError(f"{where}: expected a table")
    if "id" in raw:
        where += f" ({raw['id']!r})"
    unknown = sorted(set(raw) - set(APPLIES_FIELDS))
    if unknown:
        raise CapabilityError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(APPLIES_FIELDS)})")
    for name in ("id", "versions", "feature", "why"):
        if not isinstance(raw.get(name), str) or (name != "versions" and not raw[name]):
            raise CapabilityError(f"{where}: field '{name}' is missing or not a non-empty string")
    try:
        SpecifierSet(raw["versions"])
    except InvalidSpecifier:
        raise CapabilityError(f"{where}: field 'versions': {raw['versions']!r} is not a version specifier "
                              "(PEP 440, e.g. '>=0.5.18'; '' for every version)") from None
    if raw["feature"] not in FEATURES:
        raise CapabilityError(f"{where}: field 'feature': {raw['feature']!r} is not one of {', '.join(FEATURES)}")
    read_from = check_read_from(raw.get("read_from", []), where, raw["versions"])
    refs = _strings(raw, "references", where, required=False)
    if not read_from and not refs:
        raise CapabilityError(f"{where}: field 'read_from' is required (the released source it was read from), "
                              "or 'references' where no line says it")
    verified = raw.get("verified", "")
    if not isinstance(verified, (str, bool)) or verified is True:
        raise CapabilityError(f"{where}: field 'verified': expected a string (where it ran on a GPU) or false")
    if not isinstance(raw.get("when", ""), str):
        raise CapabilityError(f"{where}: field 'when': expected a string")
    return Applies(raw["id"], raw["versions"], _strings(raw, "backends", where), raw["feature"], raw.get("when", ""),
                   _strings(raw, "sets", where), raw["why"], read_from, refs, verified or "")


def read_applies(data: dict, path: str) -> list[Applies]:
    raw = data.get("applies", [])
    if not isinstance(raw, list):
        raise CapabilityError(f"{path}: 'applies' must be an array of tables ([[applies]])")
    entries = [parse_applies(a, i, path) for i, a in enumerate(raw)]
    seen: set[str] = set()
    for a in entries:
        if a.id in seen:
            raise CapabilityError(f"{path}: [[applies]] field 'id': {a.id!r} is used by two entries")
        seen.add(a.id)
    return entries


def versions_read(entries: list[Applies]) -> list[str]:
    """Every SGLang version whose released source the data was read from, oldest first."""
    from packaging.version import Version

    found = {r.split(" ", 1)[0] for a in entries for r in a.read_from}
    return sorted(found, key=Version)


def explain(entries: list[Applies], version: str, backend: str | None) -> list[tuple[str, str]]:
    """(title, text) per setting deterministic mode applies on this version/backend, in data order."""
    out = []
    for a in entries:
        if not a.matches(version, backend):
            continue
        where = "" if "*" in a.backends else f" [{', '.join(a.backends)}]"
        when = f" when {a.when}" if a.when else ""
        text = f"{'; '.join(a.sets)}{when}: {a.why}"
        source = a.source_for(version)
        if source:
            text += f" (read from {source})"
        if a.references:
            text += f" (see {'; '.join(a.references)})"
        text += f" [verified: {a.verified}]" if a.verified else " [unverified: read from the released source]"
        out.append((f"sglang {version} deterministic mode: {a.feature}{where}", text))
    return out


def doctor_findings(entries: list[Applies], version: str | None, backend: str | None, given: bool) -> list:
    """The doctor's lines for SGLang `version` (installed, or `given` by --sglang-version): which
    settings deterministic mode applies there and why. A given version must be one the data was
    read from (InputError naming the versions read); an installed one outside them is said so."""
    from pytest_miles.errors import InputError
    from pytest_miles.facts.doctor import INFO, SKIP, Finding

    read = versions_read(entries)
    span = f"{read[0]} to {read[-1]}" if read else "none"
    if given and version not in read:
        raise InputError(f"--sglang-version: {version!r} is not a version the capability data was read from "
                         f"(accepted: {', '.join(read)})")
    if version is None:
        return [Finding("sglang deterministic mode", SKIP, "sglang is not installed here; pass --sglang-version "
                        f"V ({', '.join(read)}) to see what its --enable-deterministic-inference sets")]
    findings = []
    if version not in read:
        findings.append(Finding("sglang deterministic mode", SKIP, f"sglang {version} is outside the versions whose "
                                f"released source was read ({span}); the lines below follow the data's version ranges"))
    on = f" on {backend}" if backend else " (every attention backend; --attention-backend narrows it)"
    findings.append(Finding("sglang deterministic mode", INFO, f"what --enable-deterministic-inference sets in sglang "
                            f"{version}{on}, read from the released source:"))
    findings += [Finding(title, INFO, text) for title, text in explain(entries, version, backend)]
    return findings
