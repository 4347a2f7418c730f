"""What an engine is made of (`EngineSpec`) and how one is started in this process: `make_engine`.

A placement (here, a Ray actor) receives the spec and calls `make_engine` where the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_miles import validation as v
from pytest_miles.errors import InputError

KINDS = ("reference", "reference-server", "sglang", "sglang-offline")


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to start one engine, wherever it starts (here, or in a Ray actor).
    Checked when built: a bad field is an InputError naming it, before anything starts."""

    kind: str
    """One of KINDS."""
    model_dir: str
    """An HF model folder (config.json and weights)."""
    deterministic: bool
    """SGLang's --enable-deterministic-inference (the embedded engines: batch-invariant mode)."""
    attention_backend: str
    """An SGLang attention backend name (flashinfer, fa3, triton, fa4, ...)."""
    extra_args: tuple[str, ...]
    """SGLang command-line arguments (Miles' `--sglang-foo` spelling is accepted)."""
    options: dict[str, Any]
    """Keyword arguments of the engine class (e.g. mem_fraction_static, tp_size, env)."""
    device: str
    """Where the engine runs: "cpu" or "cuda"."""
    log_dir: str
    """Where the engine's log goes."""
    startup_timeout: float
    """Seconds the engine may take to become healthy."""
    request_timeout: float = 300.0
    """Seconds one request may take."""

    def __post_init__(self) -> None:
        v.choice("engine_factory(kind)", self.kind, KINDS)
        v.boolean("engine_factory(deterministic=)", self.deterministic)
        v.backend_name("engine_factory(attention_backend=)", self.attention_backend)
        object.__setattr__(self, "extra_args", v.strings("engine_factory(extra_args=)", self.extra_args))
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise InputError(f"engine_factory(**options): {self.options!r} is not accepted; "
                             "expected keyword arguments")
        v.choice("EngineSpec(device=)", self.device, ("cpu", "cuda"))
        v.number("EngineSpec(startup_timeout=)", self.startup_timeout)
        v.number("EngineSpec(request_timeout=)", self.request_timeout)
        object.__setattr__(self, "log_dir", str(v.path_like("EngineSpec(log_dir=)", self.log_dir)))
        model = v.path_like("engine_factory(model=)", self.model_dir)
        object.__setattr__(self, "model_dir", v.model_folder("engine_factory(model=)", str(model)))
        if self.kind.startswith("sglang"):
            _tp_size(self.extra_args, self.options)  # a bad size is named now, not when GPUs are leased
            _chunking(self)
        _dump_options(self.kind, self.options)

    @property
    def gpus(self) -> int:
        """GPUs this engine holds: SGLang's tensor parallel size (`--tp`, `--tp-size`,
        `--tensor-parallel-size` in extra_args, or the `tp_size` option) for SGLang engines."""
        if not (self.kind.startswith("sglang") or self.device == "cuda"):
            return 0
        return max(1, _tp_size(self.extra_args, self.options)) if self.kind.startswith("sglang") else 1


def _dump_options(kind: str, options: dict[str, Any]) -> None:
    """dump_hidden_states (a bool, SGLang engines only) and dump_dir (only with it)."""
    if "dump_hidden_states" in options:
        v.boolean("engine_factory(dump_hidden_states=)", options["dump_hidden_states"])
        if not kind.startswith("sglang"):
            raise InputError(f"engine_factory(dump_hidden_states=): an option of the SGLang engines (their tensor "
                             f"dump); the {kind!r} engine gives per-layer hidden states through hooks")
    if "dump_dir" in options and options.get("dump_hidden_states") is not True:
        raise InputError("engine_factory(dump_dir=): the tensor dump's folder, accepted only with "
                         "dump_hidden_states=True")


def _chunking(spec: EngineSpec) -> None:
    """A deterministic SGLang server whose prefill chunk is below its alignment starves long prompts."""
    import os

    from pytest_miles.engines.sglang_chunking import check_deterministic_chunking

    env = spec.options.get("env") or {}
    if not isinstance(env, dict):
        raise InputError(f"engine_factory(env=): {env!r} is not accepted; expected a dict of strings")
    check_deterministic_chunking(spec.deterministic, spec.attention_backend, spec.extra_args,
                                 {**os.environ, **env})


TP_FLAGS = ("--tp", "--tp-size", "--tensor-parallel-size")


def _tp_size(extra_args: tuple[str, ...], options: dict[str, Any]) -> int:
    """The tensor parallel size an SGLang command line asks for (the last flag wins, as argparse;
    every one must parse, as argparse's)."""
    from pytest_miles.engines.base import flag_values

    size = _size("engine option tp_size", options.get("tp_size", 1))
    for flag, value in flag_values(extra_args, TP_FLAGS):
        size = _size(f"SGLang argument {flag}", value or "")
    return size


def _size(where: str, value: Any) -> int:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        return int(value)
    except ValueError:
        raise InputError(f"{where}: {value!r} is not an integer tensor parallel size") from None


SERVER_KINDS = ("sglang", "reference-server")  # engines in a process of their own: they can start in the background


def make_engine(spec: EngineSpec):
    if spec.kind in SERVER_KINDS:
        return build_server(spec).start()
    kind, opts = spec.kind, {k: val for k, val in spec.options.items() if k != "dump_hidden_states"}
    if kind == "sglang-offline" and spec.options.get("dump_hidden_states"):  # the divergence locator's engine
        from pytest_miles.engines.sglang_dump import SGLangOfflineDumpEngine

        return SGLangOfflineDumpEngine(spec.model_dir, deterministic=spec.deterministic,
                                       attention_backend=spec.attention_backend, **opts)
    if kind == "reference":
        from pytest_miles.engines.reference import ReferenceEngine

        return ReferenceEngine(spec.model_dir, deterministic=spec.deterministic, device=spec.device, **opts)
    from pytest_miles.engines.sglang_offline import SGLangOfflineEngine

    return SGLangOfflineEngine(spec.model_dir, deterministic=spec.deterministic,
                               attention_backend=spec.attention_backend, **opts)


def build_server(spec: EngineSpec):
    """The server engine of a spec of SERVER_KINDS, not started yet (`.start()` starts it; `.cancel()`
    from another thread stops a start under way)."""
    opts = {k: val for k, val in spec.options.items() if k != "dump_hidden_states"}
    if spec.kind == "reference-server":
        from pytest_miles.engines.reference_server_engine import ReferenceServerEngine

        return ReferenceServerEngine(spec.model_dir, deterministic=spec.deterministic, device=spec.device,
                                     log_dir=spec.log_dir, request_timeout=spec.request_timeout,
                                     **{"startup_timeout": spec.startup_timeout, **opts})
    if spec.kind != "sglang":
        raise InputError(f"engine kind {spec.kind!r} does not run as a server of its own; those that do: "
                         f"{', '.join(SERVER_KINDS)}")
    if spec.options.get("dump_hidden_states"):  # the divergence locator's engine
        from pytest_miles.engines.sglang_dump import SGLangDumpEngine as Server
    else:
        from pytest_miles.engines.server import SGLangEngine as Server
    return Server(spec.model_dir, deterministic=spec.deterministic, attention_backend=spec.attention_backend,
                  extra_args=spec.extra_args, log_dir=spec.log_dir, startup_timeout=spec.startup_timeout,
                  request_timeout=spec.request_timeout, **opts)
