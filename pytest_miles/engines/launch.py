"""What an engine is made of (`EngineSpec`) and how one is started in this process: `make_engine`.

A placement (here, a Ray actor) receives the spec and calls `make_engine` where the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("reference", "reference-server", "sglang", "sglang-offline")


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to start one engine, wherever it starts (here, or in a Ray actor)."""

    kind: str
    model_dir: str
    deterministic: bool
    attention_backend: str
    extra_args: tuple[str, ...]
    options: dict[str, Any]
    device: str
    log_dir: str
    startup_timeout: float
    request_timeout: float = 300.0

    @property
    def gpus(self) -> int:
        """GPUs this engine holds: SGLang's tensor parallel size (`--tp`, `--tp-size`,
        `--tensor-parallel-size` in extra_args, or the `tp_size` option) for SGLang engines."""
        if not (self.kind.startswith("sglang") or self.device == "cuda"):
            return 0
        return max(1, _tp_size(self.extra_args, self.options)) if self.kind.startswith("sglang") else 1


TP_FLAGS = ("--tp", "--tp-size", "--tensor-parallel-size")


def _tp_size(extra_args: tuple[str, ...], options: dict[str, Any]) -> int:
    """The tensor parallel size an SGLang command line asks for (the last flag wins, as argparse)."""
    size = options.get("tp_size", 1)
    args = list(extra_args)
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in TP_FLAGS:
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            try:
                size = int(value)
            except ValueError:
                raise ValueError(f"SGLang argument {flag}: {value!r} is not an integer tensor parallel size") from None
    return int(size)


def make_engine(spec: EngineSpec):
    kind, opts = spec.kind, spec.options
    if kind == "reference":
        from pytest_miles.engines.reference import ReferenceEngine

        return ReferenceEngine(spec.model_dir, batch_invariant=spec.deterministic, device=spec.device, **opts)
    if kind == "reference-server":
        from pytest_miles.engines.server import ReferenceServerEngine

        return ReferenceServerEngine(spec.model_dir, batch_invariant=spec.deterministic, device=spec.device,
                                     log_dir=spec.log_dir, request_timeout=spec.request_timeout, **opts).start()
    if kind == "sglang":
        from pytest_miles.engines.server import SGLangEngine

        return SGLangEngine(spec.model_dir, deterministic=spec.deterministic, attention_backend=spec.attention_backend,
                            extra_args=spec.extra_args, log_dir=spec.log_dir, startup_timeout=spec.startup_timeout,
                            request_timeout=spec.request_timeout, **opts).start()
    from pytest_miles.engines.sglang_offline import SGLangOfflineEngine

    return SGLangOfflineEngine(spec.model_dir, deterministic=spec.deterministic,
                               attention_backend=spec.attention_backend, **opts)
