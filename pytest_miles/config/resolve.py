"""Settings resolved once: every source read and validated at configure, as pytest-timeout does.

Precedence: CLI > environment > config file (--miles-config) > ini > default. A bad value is one
`InputError` naming its source (option, variable, file and table, ini key and file) and what is
accepted. Markers are read by the code that owns them.
"""

from __future__ import annotations

import os
from dataclasses import make_dataclass
from typing import TYPE_CHECKING, Any

from pytest_miles.config.settings import BY_NAME, GROUP_TITLES, SETTINGS, Setting, _accepted
from pytest_miles.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pytest

def _parse(setting: Setting, raw: Any, source: str) -> Any:
    """The value parsed to the setting's kind, then checked (range, finiteness, paths): see validation.py."""
    from pytest_miles.validation import check_setting

    if isinstance(raw, str) and raw.strip() == "" and setting.kind != "bool" and not source.startswith(
            ("environment variable", "ini key")):  # an empty variable or ini value means unset (documented)
        raise InputError(f"{source}: an empty value is not accepted; expected {_accepted(setting)} "
                         "(leave the option out to use the default)")
    if setting.kind in ("int", "float") and (
            isinstance(raw, bool) or (setting.kind == "int" and isinstance(raw, float))):
        raise InputError(f"{source}: {raw!r} is not {'an integer' if setting.kind == 'int' else 'a number'}")
    return check_setting(setting.name, _parse_kind(setting, raw, source), source)


def _parse_kind(setting: Setting, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    if setting.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise InputError(f"{source}: {raw!r} is not a boolean (use 1/0, true/false)")
    if setting.kind == "int":
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise InputError(f"{source}: {raw!r} is not an integer") from None
    if setting.kind == "float":
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise InputError(f"{source}: {raw!r} is not a number") from None
    text = str(raw).strip()
    if setting.kind == "choice" and text not in setting.choices:
        raise InputError(f"{source}: {text!r} is not one of {', '.join(setting.choices)}")
    return text


def resolve(config: pytest.Config | None, name: str, environ: dict[str, str] | None = None) -> Any:
    """Value of a setting: CLI > environment > ini > default. Bad values name their source."""
    s = BY_NAME[name]
    env = os.environ if environ is None else environ
    if config is not None:
        cli = config.getoption(s.dest, default=None)
        if cli not in (None, False):
            return _parse(s, cli, f"option {s.cli}")
    if s.env and env.get(s.env, "") != "":
        return _parse(s, env[s.env], f"environment variable {s.env}")
    if name != "config":
        path = resolve(config, "config", environ)
        if path:
            table = _config_file(str(path))
            if s.name in table:
                return _parse(s, table[s.name], f"{path}: [{s.group}] {s.name}")
    if config is not None:
        where = f"ini key {s.ini}" + (f" in {config.inipath}" if config.inipath else "")
        try:
            ini = config.getini(s.ini)
        except Exception as exc:  # pytest's typed parsing (ValueError/TypeError; UsageError since 9.2)
            raise _ini_error(config, s, where, exc) from None
        if ini not in (None, "", []):
            return _parse(s, ini, where)
    return s.default


def _raw_ini(config: pytest.Config, key: str) -> Any:
    """The ini value as written, before pytest converted it (None where this pytest hides it)."""
    raw = getattr(config, "_inicfg", None)  # pytest >= 9: {key: ConfigValue(value=...)}
    if isinstance(raw, dict) and key in raw:
        return getattr(raw[key], "value", raw[key])
    legacy = getattr(config, "inicfg", None)  # pytest 8: {key: str}
    try:
        return legacy[key] if legacy is not None and key in legacy else None
    except Exception:  # noqa: BLE001  (a deprecated accessor that may warn or raise)
        return None


def _ini_error(config: pytest.Config, s: Setting, where: str, exc: Exception) -> InputError:
    """A value pytest could not convert, judged by our parser: key, file and what is accepted."""
    if type(exc).__name__ not in ("ValueError", "TypeError", "UsageError"):
        raise exc
    raw = _raw_ini(config, s.ini)
    if raw is None:  # fall back on the value quoted at the end of pytest's message
        import ast
        import re

        quoted = re.search(r"""(['"]).*\1\s*$""", str(exc))
        raw = ast.literal_eval(quoted.group(0).strip()) if quoted else None
    if raw is not None:
        try:
            _parse(s, raw, where)
        except ValueError as ours:
            return ours
    return InputError(f"{where}: {exc} (expected {_accepted(s)})")


_CONFIG_CACHE: dict[str, dict[str, Any]] = {}


def _config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML file: `[rollout] trials = 20`. Unknown tables or keys are errors."""
    if path not in _CONFIG_CACHE:
        from pytest_miles._files import load_toml

        if not os.path.lexists(path):
            raise InputError(f"{path}: config file not found (--miles-config / PYTEST_MILES_CONFIG)")
        data = load_toml(path, "config file (--miles-config)")
        flat: dict[str, Any] = {}
        for table, values in data.items():
            if table not in GROUP_TITLES or not isinstance(values, dict):
                raise InputError(f"{path}: unknown table [{table}] (known: {', '.join(GROUP_TITLES)})")
            for key, value in values.items():
                if key not in BY_NAME or BY_NAME[key].group != table:
                    known = ", ".join(x.name for x in SETTINGS if x.group == table)
                    raise InputError(f"{path}: [{table}] has no setting {key!r} (known: {known})")
                flat[key] = value
        _CONFIG_CACHE[path] = flat
    return _CONFIG_CACHE[path]


Settings = make_dataclass("Settings", [(s.name, Any) for s in SETTINGS], frozen=True, slots=True,
                          namespace={"__doc__": "Every setting's value for one session (attributes by name).",
                                     "get": lambda self, name: getattr(self, name)})


def resolve_all(config: pytest.Config | None, environ: dict[str, str] | None = None) -> Any:
    """Every setting, resolved and validated once: a frozen `Settings`. The first bad value raises."""
    return Settings(**{s.name: resolve(config, s.name, environ) for s in SETTINGS})
