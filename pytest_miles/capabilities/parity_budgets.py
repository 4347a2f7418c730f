"""Train-rollout parity budgets as versioned data: per model shape x rollout precision x train
precision x attention backend x tensor parallel size, either `exact` (every token's logprob
bitwise equal) or a tolerance with the calibration it came from (runs, statistic, host, date,
versions). The packaged file is `parity_budgets.toml` beside this module; a configuration with no
budget is unbudgeted, never passed. `derive_budget` turns N parity reports into a budget
(`pytest-miles parity-budget`), as Megatron's `compute_golden_statistics.py --recommend-tolerances`
derives tolerances from runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.errors import BudgetError, InputError

PACKAGED = Path(__file__).with_name("parity_budgets.toml")
KEY_FIELDS = ("model", "rollout", "train", "backend", "tp")
KINDS = ("exact", "tolerance")
PAIRS = ("train_vs_decode", "train_vs_prefill", "prefill_vs_decode")
BUDGET_FIELDS = (*KEY_FIELDS, "kind", "pair", "mean_abs", "max_abs", "k3_kl", "note", "calibration")
CALIBRATION_FIELDS = ("runs", "statistic", "host", "date", "versions")


@dataclass(frozen=True)
class Budget:
    """One [[budget]]: the configuration it is for, and what a parity report must stay within."""

    model: str
    rollout: str
    train: str
    backend: str
    tp: int
    kind: str
    pair: str = "train_vs_decode"
    mean_abs: float | None = None
    max_abs: float | None = None
    k3_kl: float | None = None
    note: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.model, self.rollout, self.train, self.backend, self.tp)

    def describe(self) -> str:
        what = "exact (every token bitwise equal)" if self.kind == "exact" else ", ".join(
            f"{n} <= {getattr(self, n):g}" for n in ("mean_abs", "max_abs", "k3_kl") if getattr(self, n) is not None)
        cal = self.calibration
        calib = (f"; calibrated from {cal['runs']} runs ({cal['statistic']}) on {cal['host']}, {cal['date']}"
                 if cal else "")
        return f"parity budget {key_text(self.key)} [{self.pair}]: {what}{calib} ({self.source})"


def key_text(key: tuple) -> str:
    return " x ".join(f"{n}={v}" for n, v in zip(KEY_FIELDS, key))


def _number(raw: dict, name: str, where: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BudgetError(f"{where}: field '{name}': expected a finite number >= 0, got {value!r}")
    return float(value)


def _calibration(raw: Any, where: str) -> dict[str, Any]:
    where = f"{where}: field 'calibration'"
    if not isinstance(raw, dict):
        raise BudgetError(f"{where}: expected a table with {', '.join(CALIBRATION_FIELDS)}")
    unknown = sorted(set(raw) - set(CALIBRATION_FIELDS))
    if unknown:
        raise BudgetError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(CALIBRATION_FIELDS)})")
    missing = [n for n in CALIBRATION_FIELDS if n not in raw]
    if missing:
        raise BudgetError(f"{where}: field '{missing[0]}' is missing (a tolerance names where it came from)")
    if isinstance(raw["runs"], bool) or not isinstance(raw["runs"], int) or raw["runs"] < 2:
        raise BudgetError(f"{where}.runs: expected an integer >= 2 (a budget from one run is a guess), "
                          f"got {raw['runs']!r}")
    for name in ("statistic", "host", "date"):
        if not isinstance(raw[name], str) or not raw[name]:
            raise BudgetError(f"{where}.{name}: expected a non-empty string, got {raw[name]!r}")
    if not isinstance(raw["versions"], dict) or not all(isinstance(v, str) for v in raw["versions"].values()):
        raise BudgetError(f"{where}.versions: expected a table of package = \"version\"")
    return dict(raw)


def _budget(raw: Any, index: int, path: str) -> Budget:
    where = f"{path}: [[budget]] #{index + 1}"
    if not isinstance(raw, dict):
        raise BudgetError(f"{where}: expected a table")
    if all(n in raw for n in KEY_FIELDS):
        where += f" ({key_text(tuple(raw[n] for n in KEY_FIELDS))})"
    unknown = sorted(set(raw) - set(BUDGET_FIELDS))
    if unknown:
        raise BudgetError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(BUDGET_FIELDS)})")
    for name in (*KEY_FIELDS, "kind"):
        if name not in raw:
            raise BudgetError(f"{where}: field '{name}' is missing")
    for name in ("model", "rollout", "train", "backend", "note"):
        if not isinstance(raw.get(name, ""), str) or (name != "note" and not raw[name]):
            raise BudgetError(f"{where}: field '{name}': expected a non-empty string, got {raw.get(name)!r}")
    tp = raw["tp"]
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise BudgetError(f"{where}: field 'tp': expected an integer >= 1, got {tp!r}")
    kind, pair = raw["kind"], raw.get("pair", "train_vs_decode")
    if kind not in KINDS:
        raise BudgetError(f"{where}: field 'kind': {kind!r} is not one of {', '.join(KINDS)}")
    if pair not in PAIRS:
        raise BudgetError(f"{where}: field 'pair': {pair!r} is not one of {', '.join(PAIRS)}")
    limits = {n: _number(raw, n, where) for n in ("mean_abs", "max_abs", "k3_kl")}
    if kind == "exact" and any(v is not None for v in limits.values()):
        raise BudgetError(
            f"{where}: field 'kind': 'exact' takes no mean_abs/max_abs/k3_kl (bitwise equal is the limit)"
        )
    if kind == "tolerance":
        if limits["mean_abs"] is None:
            raise BudgetError(f"{where}: field 'mean_abs' is missing (a tolerance needs at least the mean |delta|)")
        if "calibration" not in raw:
            raise BudgetError(f"{where}: field 'calibration' is missing (a tolerance says which runs it came from)")
    calibration = _calibration(raw["calibration"], where) if "calibration" in raw else {}
    return Budget(
        raw["model"],
        raw["rollout"],
        raw["train"],
        raw["backend"],
        tp,
        kind,
        pair,
        **limits,
        note=raw.get("note", ""),
        calibration=calibration,
        source=path,
    )


def read_budgets(path: str | Path) -> list[Budget]:
    """Every [[budget]] of one file, validated; BudgetError names the file, the budget and the field."""
    from pytest_miles._files import load_toml

    path = str(path)
    try:
        data = load_toml(path, "parity budget file")
    except InputError as exc:
        raise BudgetError(str(exc)) from None
    unknown = sorted(set(data) - {"meta", "budget"})
    if unknown:
        raise BudgetError(f"{path}: unknown table(s) {', '.join(unknown)} (known: [meta], [[budget]])")
    meta = data.get("meta", {})
    if not isinstance(meta, dict) or meta.get("schema", 1) != 1:
        raise BudgetError(
            f"{path}: [meta] field 'schema': {meta.get('schema') if isinstance(meta, dict) else meta!r} "
            "is not supported (this is schema 1)"
        )
    raw = data.get("budget", [])
    if not isinstance(raw, list):
        raise BudgetError(f"{path}: 'budget' must be an array of tables ([[budget]])")
    budgets = [_budget(b, i, path) for i, b in enumerate(raw)]
    seen: set[tuple] = set()
    for b in budgets:
        if (b.key, b.pair) in seen:
            raise BudgetError(f"{path}: {key_text(b.key)} [{b.pair}] has two budgets")
        seen.add((b.key, b.pair))
    return budgets


def find_budget(key: tuple, pair: str = "train_vs_decode", user: str | Path | None = None) -> Budget | None:
    """The budget for this configuration (the user's file first, then the packaged one), or None."""
    files = ([user] if user else []) + [PACKAGED]
    model, rollout, train, backend, tp = key
    for f in files:
        for b in read_budgets(f):
            if b.key == (model, rollout, train, backend, int(tp)) and b.pair == pair:
                return b
    return None


def _toml_str(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but for DEL, which TOML wants escaped too."""
    import json

    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _report_figures(report: Any, where: str, pair: str) -> tuple[tuple, dict[str, Any]]:
    """What a budget is made of, read from one report (a ParityReport.to_json()): its configuration key and its
    `pair` figures, each field checked; InputError names the report and the field."""

    def bad(field_: str, expected: str, value: Any) -> InputError:
        return InputError(f"parity-budget: {where}: field '{field_}': expected {expected}, got {value!r:.80}")

    if not isinstance(report, dict) or not isinstance(report.get("config"), dict) \
            or not isinstance(report.get("pairs"), dict):
        raise InputError(f"parity-budget: {where}: not a parity report (no 'pairs'/'config' tables; write one with "
                         "ParityReport.to_json())")
    config, key = report["config"], []
    for name in KEY_FIELDS:
        value = config.get(name)
        if name == "tp" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad(f"config.{name}", "an integer >= 1", value)
        if name != "tp" and (not isinstance(value, str) or not value):
            raise bad(f"config.{name}", "a non-empty string", value)
        key.append(value)
    figs = report["pairs"].get(pair)
    if not isinstance(figs, dict):
        raise InputError(f"parity-budget: {where}: no {pair} figures (pairs present: "
                         f"{', '.join(map(str, report['pairs'])) or 'none'})")
    for name in ("mean_abs", "max_abs", "k3_kl"):
        value = figs.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise bad(f"pairs.{pair}.{name}", "a finite number >= 0", value)
    for name in ("tokens", "bitwise_equal"):
        value = figs.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "tokens" else 0):
            raise bad(f"pairs.{pair}.{name}", f"an integer >= {1 if name == 'tokens' else 0}", value)
    if figs["bitwise_equal"] > figs["tokens"]:
        raise bad(f"pairs.{pair}.bitwise_equal", f"at most its tokens ({figs['tokens']})", figs["bitwise_equal"])
    if not isinstance(report.get("identity_errors", []), list):
        raise bad("identity_errors", "a list", report["identity_errors"])
    versions = report.get("versions") or {}
    if not isinstance(versions, dict) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                 for v in versions.values()):
        raise bad("versions", "a table of package = version", versions)
    return tuple(key), figs


def derive_budget(
    reports: list[dict[str, Any]], *, margin: float = 1.5, host: str, date: str, pair: str = "train_vs_decode",
    sources: list[str] | None = None,
) -> str:
    """A [[budget]] TOML block from N parity reports (their to_json()) of one configuration:
    `exact` when every run had every token bitwise equal, else a tolerance of `margin` x the worst
    run's mean and max |delta| and K3-KL. InputError when the reports are too few, mixed or malformed
    (`sources`: the reports' names in those messages). The block is read back as a budget file is."""
    if len(reports) < 2:
        raise InputError(f"parity-budget: {len(reports)} report(s); give at least 2 runs of one configuration")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 1:
        raise InputError(f"parity-budget: margin {margin}: expected a finite number >= 1 (a budget below what "
                         "was measured fails its own runs)")
    if pair not in PAIRS:
        raise InputError(f"parity-budget: pair {pair!r} is not one of {', '.join(PAIRS)}")
    for name, value in (("host", host), ("date", date)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"parity-budget: {name} {value!r}: expected a non-empty name")
    names = sources or [f"report #{i + 1}" for i in range(len(reports))]
    read = [_report_figures(r, names[i], pair) for i, r in enumerate(reports)]
    keys = {key for key, _ in read}
    if len(keys) != 1:
        raise InputError("parity-budget: the reports are not of one configuration: " + "; ".join(
            f"{names[i]}: {key_text(key)}" for i, (key, _) in enumerate(read)))
    (key,), figs = keys, [f for _, f in read]
    flawed = [names[i] for i, r in enumerate(reports) if r.get("identity_errors")]
    if flawed:
        raise InputError(
            f"parity-budget: {', '.join(flawed)}: identity errors (token shift, mask, selected token); fix those "
            "first: a budget is for numerical drift only"
        )
    versions = {str(k): str(v) for k, v in sorted((reports[0].get("versions") or {}).items())}
    lines = ["[[budget]]"] + [f"{n} = {_toml_str(key[i])}" if n != "tp" else f"tp = {key[i]}"
                              for i, n in enumerate(KEY_FIELDS)]
    lines.append(f"pair = {_toml_str(pair)}")
    if all(f["bitwise_equal"] == f["tokens"] for f in figs):
        lines.append('kind = "exact"')
        statistic = "every token bitwise equal in every run"
    else:
        lines.append('kind = "tolerance"')
        for name in ("mean_abs", "max_abs", "k3_kl"):
            lines.append(f"{name} = {max(f[name] for f in figs) * margin:.6g}")
        statistic = f"max over runs x {margin:g}"
    lines.append(
        f"calibration = {{ runs = {len(reports)}, statistic = {_toml_str(statistic)}, host = {_toml_str(host)}, "
        f"date = {_toml_str(date)}, versions = {{ "
        + ", ".join(f"{_toml_str(k)} = {_toml_str(v)}" for k, v in versions.items()) + " } }"
    )
    text = "\n".join(lines) + "\n"
    _read_back(text)
    return text


def _read_back(text: str) -> None:
    """The block must be what read_budgets accepts: a budget printed is a budget a user can keep."""
    import tomllib

    try:
        _budget(tomllib.loads(text)["budget"][0], 0, "the derived budget")
    except (tomllib.TOMLDecodeError, BudgetError) as exc:  # pragma: no cover - a bug here, not a bad input
        raise InputError(f"parity-budget: the derived budget does not read back ({exc}):\n{text}") from None


def budget_from_files(paths: list[str], **kwargs: Any) -> str:
    """derive_budget over parity report JSON files; InputError naming a file that is not one, or its field."""
    from pytest_miles._files import load_json

    return derive_budget([load_json(path, "parity report") for path in paths], sources=list(map(str, paths)),
                         **kwargs)
