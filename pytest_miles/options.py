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

BY_NAME = {s.name: s for s in SETTINGS}


def _parse(setting: Setting, raw: Any, source: str) -> Any:
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


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "determinism of LLM RL stacks (pytest-miles)")
    for s in SETTINGS:
        kwargs: dict[str, Any] = {"dest": s.dest, "default": None, "help": f"[{s.group}] {s.help}"}
        if s.kind == "bool":
            kwargs["action"] = "store_true"
        group.addoption(s.cli, **kwargs)
        parser.addini(s.ini, help=s.help, type="string", default=None)


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
    if config is not None:
        ini = config.getini(s.ini)
        if ini not in (None, "", []):
            return _parse(s, ini, f"ini key {s.ini}")
    return s.default
