"""The troubleshooting table (symptom -> cause -> fix) as data: `troubleshooting.toml` beside this
module, read once and strictly, so that the doctor, the snapshot diagnosis, the iteration walk and
the RL-loop comparison name the same likely cause in the same words. A bad file is an InputError
naming the file, the row and the field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_miles.errors import InputError

PACKAGED = Path(__file__).with_name("troubleshooting.toml")
TEXT_FIELDS = ("id", "symptom", "cause", "fix")
KEY_FIELDS = ("doctor", "fingerprint", "stages")
ROW_FIELDS = (*TEXT_FIELDS, "guide", *KEY_FIELDS)
# Where a divergence first shows: the loop's stages, the iteration walk's two cases, and "elsewhere"
# (only across nodes or only on another machine).
STAGES = ("rollout", "reward", "train", "weight_sync", "after_first", "from_first", "elsewhere")


@dataclass(frozen=True)
class Row:
    id: str
    symptom: str
    cause: str
    fix: str
    guide: bool = True  # from the Miles reproducibility guide (False: pytest-miles' own row)
    doctor: tuple[str, ...] = ()
    fingerprint: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()

    def arrow(self) -> str:
        """`symptom -> cause`, the guide's own form."""
        return f"{self.symptom} -> {self.cause}"

    def explained(self) -> str:
        """`symptom: cause` (a guide row), or the cause alone (pytest-miles' own rows say it all there)."""
        return f"{self.symptom}: {self.cause}" if self.guide else self.cause


def _row(raw: Any, index: int, path: str) -> Row:
    where = f"{path}: row {index + 1}" + (f" ({raw['id']!r})" if isinstance(raw, dict) and "id" in raw else "")
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a table ([[row]])")
    unknown = sorted(set(raw) - set(ROW_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(ROW_FIELDS)})")
    for name in TEXT_FIELDS:
        if name not in raw:
            raise InputError(f"{where}: field '{name}' is missing")
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise InputError(f"{where}: field '{name}': expected a non-empty string, got {raw[name]!r}")
    if not isinstance(raw.get("guide", True), bool):
        raise InputError(f"{where}: field 'guide': expected true or false, got {raw['guide']!r}")
    keys = {}
    for name in KEY_FIELDS:
        value = raw.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InputError(f"{where}: field '{name}': expected a list of non-empty strings, got {value!r}")
        keys[name] = tuple(value)
    bad = [s for s in keys["stages"] if s not in STAGES]
    if bad:
        raise InputError(f"{where}: field 'stages': {bad[0]!r} is not one of {', '.join(STAGES)}")
    return Row(raw["id"], raw["symptom"], raw["cause"], raw["fix"], raw.get("guide", True), **keys)


def read_file(path: str | Path) -> list[Row]:
    """The rows of one troubleshooting file, validated."""
    from pytest_miles._files import load_toml

    path = str(path)
    data = load_toml(path, "troubleshooting file (a TOML file of [[row]] tables)")
    unknown = sorted(set(data) - {"row"})
    if unknown:
        raise InputError(f"{path}: unknown table(s) {', '.join(unknown)} (known: [[row]])")
    if not isinstance(data.get("row"), list) or not data["row"]:
        raise InputError(f"{path}: 'row' must be a non-empty array of tables ([[row]])")
    rows = [_row(r, i, path) for i, r in enumerate(data["row"])]
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise InputError(f"{path}: field 'id': {r.id!r} is used by two rows")
        seen.add(r.id)
    return rows


@functools.cache
def rows() -> tuple[Row, ...]:
    """The packaged table, read once per process."""
    return tuple(read_file(PACKAGED))


def for_doctor(check: str) -> Row:
    """The row of one doctor check (an environment variable's name, or the check's name)."""
    found = [r for r in rows() if check in r.doctor]
    if not found:
        raise InputError(f"{PACKAGED}: no row for the doctor check {check!r} (field 'doctor')")
    return found[0]


def for_stage(stage: str) -> list[Row]:
    """The rows of a divergence stage, in file order (the likeliest first)."""
    if stage not in STAGES:
        raise InputError(f"divergence stage {stage!r} is not one of {', '.join(STAGES)}")
    found = [r for r in rows() if stage in r.stages]
    if not found:
        raise InputError(f"{PACKAGED}: no row for the divergence stage {stage!r} (field 'stages')")
    return found


def for_fingerprint(field: str) -> Row:
    """The row of a fingerprint field: its own, else its family's (`packages.*`), else the `*` row."""
    for pattern in (field, field.split(".", 1)[0] + ".*" if "." in field else None, "*"):
        found = [r for r in rows() if pattern in r.fingerprint]
        if found:
            return found[0]
    raise InputError(f"{PACKAGED}: no row for the fingerprint field {field!r} and no '*' row (field 'fingerprint')")
