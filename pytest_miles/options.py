"""Every pytest-miles setting, defined once: CLI option, ini key, environment variable and help.

Precedence (as in pytest-timeout): marker > CLI > environment > ini > default. Markers are
read by the code that owns them; this module resolves the other four.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pytest

GROUP = "miles"
# Setting groups follow Miles' launch-argument groups (seed 003), plus the plugin's own.
GROUP_TITLES = {
    "general": "pytest-miles",
    "hardware": "pytest-miles hardware (GPU markers)",
    "model": "pytest-miles MODEL_ARGS / CKPT_ARGS (model and checkpoints)",
    "rollout": "pytest-miles ROLLOUT_ARGS (engine, sampling, trials)",
    "sglang": "pytest-miles SGLANG_ARGS (passthrough to the SGLang server)",
    "performance": "pytest-miles PERF_ARGS (device, parallelism)",
    "precision": "pytest-miles precision (rollout x training formats)",
    "cluster": "pytest-miles cluster (Ray, GPU leasing under pytest-xdist)",
    "snapshots": "pytest-miles snapshots",
    "report": "pytest-miles report",
}


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: Any = None
    kind: str = "string"  # "string" | "bool" | "int" | "float" | "choice"
    choices: tuple[str, ...] = ()
    env: str | None = None
    group: str = "general"

    @property
    def cli(self) -> str:
        return "--miles-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "miles_" + self.name

    @property
    def dest(self) -> str:
        return "miles_" + self.name


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "gpu_class",
        "Pretend this machine has these GPUs instead of discovering them: a class (ampere, hopper, "
        "blackwell, blackwell_consumer, none) or a model (a100, l40s, h100, h200, b200, gb200, rtx5090, "
        "mi300x), optionally with a count: h100x8.",
        env="PYTEST_MILES_GPU_CLASS",
        group="hardware",
    ),
    Setting(
        "require_gpu",
        "Fail, instead of skip, tests whose GPU markers this machine cannot satisfy (for GPU CI, where "
        "a silent skip would hide a broken driver).",
        default=False,
        kind="bool",
        env="PYTEST_MILES_REQUIRE_GPU",
        group="hardware",
    ),
    Setting(
        "engine",
        "Rollout engine behind the `engine` fixture: reference (embedded torch, in-process), "
        "reference-server (the same behind SGLang's HTTP API, in a subprocess), sglang (real server), "
        "sglang-offline (in-process sglang.Engine).",
        default="reference",
        kind="choice",
        choices=("reference", "reference-server", "sglang", "sglang-offline"),
        env="PYTEST_MILES_ENGINE",
        group="rollout",
    ),
    Setting(
        "model",
        "Model directory (HF layout) the engines load; default: the embedded tiny seeded model.",
        env="PYTEST_MILES_MODEL",
        group="model",
    ),
    Setting(
        "attention_backend",
        "SGLang attention backend for deterministic inference (flashinfer, fa3, triton, fa4).",
        default="flashinfer",
        env="PYTEST_MILES_ATTENTION_BACKEND",
        group="sglang",
    ),
    Setting(
        "trials",
        "Trials per batch-invariance check mode.",
        default=10,
        kind="int",
        env="PYTEST_MILES_TRIALS",
        group="rollout",
    ),
    Setting(
        "engine_timeout",
        "Seconds an engine may take to become healthy before it is killed.",
        default=300.0,
        kind="float",
        env="PYTEST_MILES_ENGINE_TIMEOUT",
        group="rollout",
    ),
    Setting(
        "device",
        "Device for the embedded engine and the trainers: auto, cpu or cuda.",
        default="auto",
        kind="choice",
        choices=("auto", "cpu", "cuda"),
        env="PYTEST_MILES_DEVICE",
        group="performance",
    ),
)

SETTINGS += (
    Setting("config", "A TOML file with [model], [rollout], [sglang], [performance], [precision], [snapshots] "
            "tables of these settings (names without the miles_ prefix); below CLI and env, above ini.",
            env="PYTEST_MILES_CONFIG", group="general"),
    Setting("sglang_args", "Extra SGLang server arguments, Miles style (--sglang-mem-fraction-static 0.5 ...).",
            default="", env="PYTEST_MILES_SGLANG_ARGS", group="sglang"),
    Setting("tensor_parallel", "Tensor-parallel size of the suite's Megatron runs.", default=1, kind="int",
            env="PYTEST_MILES_TENSOR_PARALLEL", group="performance"),
    Setting("train_steps", "Optimizer steps of the suite's Megatron runs.", default=4, kind="int",
            env="PYTEST_MILES_TRAIN_STEPS", group="performance"),
    Setting(
        "report",
        "Write a JSON report of this session's determinism checks (with the fingerprint) to this path.",
        env="PYTEST_MILES_REPORT",
        group="report",
    ),
)

SETTINGS += (
    Setting("snapshot_dir", "Where determinism snapshots live (relative to the rootdir).",
            default="fixtures/snapshots", env="PYTEST_MILES_SNAPSHOT_DIR", group="snapshots"),
    Setting("snapshot_update", "Write determinism snapshot records that are missing or failing.",
            default=False, kind="bool", env="PYTEST_MILES_SNAPSHOT_UPDATE", group="snapshots"),
    Setting("snapshot_regen_all", "Rewrite every determinism snapshot record the run touches.",
            default=False, kind="bool", env="PYTEST_MILES_SNAPSHOT_REGEN_ALL", group="snapshots"),
)

SETTINGS += (
    Setting("ray_address", "Ray cluster for the ray_cluster fixture (a GCS address host:port, or 'auto'); "
            "RAY_ADDRESS is used when this is unset; default: start a local head for the session.",
            env="PYTEST_MILES_RAY_ADDRESS", group="cluster"),
    Setting("ray_timeout", "Seconds to wait for the Ray cluster (connect, start) and for each probe.",
            default=60.0, kind="float", env="PYTEST_MILES_RAY_TIMEOUT", group="cluster"),
    Setting("placement", "Where the engine and trainer fixtures start their processes: local subprocesses, "
            "or Ray actors on the ray_cluster (one actor per engine / per trainer rank).",
            default="local", kind="choice", choices=("local", "ray"), env="PYTEST_MILES_PLACEMENT", group="cluster"),
    Setting("gpu_lease", "Lease GPUs through file locks so that pytest-xdist workers never share one: auto "
            "(on under xdist), on, off.", default="auto", kind="choice", choices=("auto", "on", "off"),
            env="PYTEST_MILES_GPU_LEASE", group="cluster"),
    Setting("gpu_lease_timeout", "Seconds a worker waits for a free GPU before failing with who holds them.",
            default=900.0, kind="float", env="PYTEST_MILES_GPU_LEASE_TIMEOUT", group="cluster"),
)

SETTINGS += (
    Setting("capabilities", "A TOML capability file (same schema as pytest_miles/capabilities/sglang.toml) whose "
            "cells are read before the packaged ones: what your stack promises, known limits, not-applicable cells.",
            env="PYTEST_MILES_CAPABILITIES", group="rollout"),
    Setting("model_shape", "Shape of the embedded seeded model the engines load when --miles-model is unset: tiny "
            "(2 layers, hidden 128), tiny128 (head_dim 128), qwen2.5-0.5b (Qwen2.5-0.5B's shape, ~1 GB bf16, "
            "written once per session).", default="tiny", kind="choice", choices=("tiny", "tiny128", "qwen2.5-0.5b"),
            env="PYTEST_MILES_MODEL_SHAPE", group="model"),
    Setting("engine_request_timeout", "Seconds one engine request (generate, score) may take before the engine is "
            "declared wedged; also bounds the health check before an engine is reused (at most 5 s).",
            default=300.0, kind="float", env="PYTEST_MILES_ENGINE_REQUEST_TIMEOUT", group="rollout"),
    Setting("gpu_lease_dir", "Lock folder of the GPU leases, shared by every pytest process of this machine "
            "(two CI jobs on one runner included); default: <tmp>/pytest-miles-leases-<uid>.",
            env="PYTEST_MILES_GPU_LEASE_DIR", group="cluster"),
    Setting("report_dir", "Directory for the report's artefacts (plots); default: next to --miles-report / "
            "--miles-report-html, else <rootdir>/.pytest-miles (never pytest's rotating basetemp).",
            env="PYTEST_MILES_REPORT_DIR", group="report"),
    Setting("report_html", "Write the determinism report as one self-contained HTML file (fingerprint, checks "
            "table, precision heatmap, negative-control plots embedded) to this path.",
            env="PYTEST_MILES_REPORT_HTML", group="report"),
    Setting("snapshot_other_config", "A snapshot record exists only for another configuration and this run's "
            "value differs: skip (default) or fail the test, naming each differing field. Equal values pass "
            "with a note either way.", default="skip", kind="choice", choices=("skip", "fail"),
            env="PYTEST_MILES_SNAPSHOT_OTHER_CONFIG", group="snapshots"),
)

BY_NAME = {s.name: s for s in SETTINGS}


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    """The value parsed to the setting's kind, then checked (range, finiteness, paths): see validation.py."""
    from .validation import check_setting

    if setting.kind in ("int", "float") and (isinstance(raw, bool) or (setting.kind == "int" and isinstance(raw, float))):
        raise ValueError(f"{source}: {raw!r} is not {'an integer' if setting.kind == 'int' else 'a number'}")
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
        raise ValueError(f"{source}: {raw!r} is not a boolean (use 1/0, true/false)")
    if setting.kind == "int":
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {raw!r} is not an integer") from None
    if setting.kind == "float":
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {raw!r} is not a number") from None
    text = str(raw).strip()
    if setting.kind == "choice" and text not in setting.choices:
        raise ValueError(f"{source}: {text!r} is not one of {', '.join(setting.choices)}")
    return text


def type_name(s: Setting) -> str:
    """What a value looks like, for --help and the README: `int`, `auto|cpu|cuda`, `bool`, `path`."""
    if s.kind == "choice":
        return "|".join(s.choices)
    if s.kind == "string" and any(w in s.name for w in ("dir", "report", "model", "config")):
        return "path"
    return {"string": "str"}.get(s.kind, s.kind)


def _accepted(s: Setting) -> str:
    """What a value of this setting looks like, in words (for error messages)."""
    return {"int": "an integer", "float": "a number", "bool": "a boolean (1/0, true/false, yes/no, on/off)",
            "choice": "one of " + ", ".join(s.choices)}.get(s.kind, "a string")


def render_help(s: Setting) -> str:
    """The help text with type, default and the other two ways to set it (pytest --help shows it)."""
    default = "unset" if s.default in (None, "") else str(s.default).lower() if s.kind == "bool" else s.default
    ways = ", ".join(w for w in (f"ini {s.ini}", f"env {s.env}" if s.env else "") if w)
    return f"{s.help} [{type_name(s)}; default: {default}; {ways}]"


def _pytest_version() -> tuple[int, int]:
    import pytest

    return tuple(int(x) for x in pytest.__version__.split(".")[:2] if x.isdigit())  # type: ignore[return-value]


def _ini_type(s: Setting) -> str:
    """Typed ini keys where this pytest has the type (int/float: pytest >= 8.4), else string.

    Typed, so that native TOML configs (``[tool.pytest]``) may write ``miles_trials = 20``; a value
    pytest cannot convert is re-read and judged by our own parser in `resolve`, which names the key,
    the file and what is accepted (pytest >= 9.2 raises its own UsageError without them).
    """
    typed = {"bool": "bool", "int": "int", "float": "float"}.get(s.kind, "string")
    if typed in ("int", "float") and _pytest_version() < (8, 4):
        return "string"
    return typed


def add_options(parser: pytest.Parser) -> None:
    for s in SETTINGS:
        group = parser.getgroup(f"{GROUP}-{s.group}", GROUP_TITLES[s.group])
        kwargs: dict[str, Any] = {"dest": s.dest, "default": None, "help": render_help(s)}
        if s.kind == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = type_name(s).upper() if s.kind != "choice" else "{" + ",".join(s.choices) + "}"
        group.addoption(s.cli, **kwargs)
        parser.addini(s.ini, help=render_help(s), type=_ini_type(s), default=s.default)


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


def _ini_error(config: pytest.Config, s: Setting, where: str, exc: Exception) -> ValueError:
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
    return ValueError(f"{where}: {exc} (expected {_accepted(s)})")


_CONFIG_CACHE: dict[str, dict[str, Any]] = {}


def _config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML file: `[rollout] trials = 20`. Unknown tables or keys are errors."""
    if path not in _CONFIG_CACHE:
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
        flat: dict[str, Any] = {}
        for table, values in data.items():
            if table not in GROUP_TITLES or not isinstance(values, dict):
                raise ValueError(f"{path}: unknown table [{table}] (known: {', '.join(GROUP_TITLES)})")
            for key, value in values.items():
                if key not in BY_NAME or BY_NAME[key].group != table:
                    known = ", ".join(x.name for x in SETTINGS if x.group == table)
                    raise ValueError(f"{path}: [{table}] has no setting {key!r} (known: {known})")
                flat[key] = value
        _CONFIG_CACHE[path] = flat
    return _CONFIG_CACHE[path]
