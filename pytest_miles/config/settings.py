"""Every pytest-miles setting, defined once: CLI option, ini key, environment variable and help.

`config.resolve` reads them (marker > CLI > environment > config file > ini > default) once per
session into a frozen `Settings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pytest

GROUP = "miles"
# Setting groups follow Miles' launch-argument groups (its launch-arguments reference), plus the plugin's own.
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
        "Seconds an engine may take to become healthy before it is killed; default: 1.5 x the measured cold "
        "start of its configuration, at least 300 (flashinfer: 405, triton: 300).",
        default=None,
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
            "written once per session); mixture of experts (Qwen3-MoE): tiny-moe (2 layers, 8 experts, top-2), "
            "qwen3-30b-a3b-2l (Qwen3-30B-A3B's layer shape, 2 layers, ~3.7 GB bf16).", default="tiny",
            kind="choice", choices=("tiny", "tiny128", "qwen2.5-0.5b", "tiny-moe", "qwen3-30b-a3b-2l"),
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

SETTINGS += (
    Setting("native", "Read DCP `.metadata` with the native reader where it was built (checkpoint compare's fast "
            "path); false: the Python reader only (same verdicts), to compare the two or rule the native one out. "
            "Also read by the `pytest-miles compare` command.", default=True, kind="bool",
            env="PYTEST_MILES_NATIVE", group="model"),
)

SETTINGS += (
    Setting("suite_profile", "Which part of the bundled suite runs: full (every check: nightly) or commit (the "
            "doctor, the single-mode negative control and batch invariance, training twice and its negative "
            "control: for every commit).", default="full", kind="choice", choices=("full", "commit"),
            env="PYTEST_MILES_SUITE_PROFILE", group="general"),
    Setting("kernel_cache_dir", "Directory for the engines' JIT kernel caches (FlashInfer, Triton, TorchInductor): "
            "keep it between CI runs and a fresh host skips minutes of compiling; `pytest-miles doctor` prints the "
            "cache key and whether it is warm.", env="PYTEST_MILES_KERNEL_CACHE", group="performance"),
    Setting("engine_prestart", "The bundled suite starts the server engines and the megatron-core rank "
            "processes its selected tests need in the background at session start (KV pools planned in tokens "
            "for one GPU) and runs the tests that need no engine first, so start-ups and kernel compilation "
            "overlap training; off: each starts when a test first asks for it. Not under pytest-xdist or "
            "--miles-placement=ray.", default="on",
            kind="choice", choices=("on", "off"), env="PYTEST_MILES_ENGINE_PRESTART", group="performance"),
    Setting("trainer_reuse", "megatron_trainer_factory trains each run in megatron-core rank processes kept for "
            "the session (one group per world size and rank environment), each run on a fresh model, optimizer, "
            "RNG and every global state megatron-core keeps, bitwise equal to a fresh process's run; off: fresh "
            "processes for every run. Not with --miles-placement=ray, TransformerEngine, or GPUs leased under "
            "pytest-xdist (those launch fresh).", default="on", kind="choice", choices=("on", "off"),
            env="PYTEST_MILES_TRAINER_REUSE", group="performance"),
)

BY_NAME = {s.name: s for s in SETTINGS}


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
