"""Engine creation and reuse for the fixtures: one live engine per configuration."""

from __future__ import annotations

import atexit
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
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
        from .reference import ReferenceEngine

        return ReferenceEngine(spec.model_dir, batch_invariant=spec.deterministic, device=spec.device, **opts)
    if kind == "reference-server":
        from .server import ReferenceServerEngine

        return ReferenceServerEngine(spec.model_dir, batch_invariant=spec.deterministic, device=spec.device,
                                     log_dir=spec.log_dir, request_timeout=spec.request_timeout, **opts).start()
    if kind == "sglang":
        from .server import SGLangEngine

        return SGLangEngine(spec.model_dir, deterministic=spec.deterministic, attention_backend=spec.attention_backend,
                            extra_args=spec.extra_args, log_dir=spec.log_dir, startup_timeout=spec.startup_timeout,
                            request_timeout=spec.request_timeout, **opts).start()
    from .sglang_offline import SGLangOfflineEngine

    return SGLangOfflineEngine(spec.model_dir, deterministic=spec.deterministic,
                               attention_backend=spec.attention_backend, **opts)


class EngineFactory:
    def __init__(self, *, model_dir: Callable[[], str], log_dir: Path, hardware: Callable[[], Any],
                 attention_backend: str = "flashinfer", startup_timeout: float = 300.0, device: str = "auto",
                 require_gpu: bool = False, extra_args: tuple[str, ...] = (),
                 placement: Callable[[], Any] | None = None, leaser: Any = None,
                 request_timeout: float = 300.0) -> None:
        self._model_dir, self.log_dir, self._hardware = model_dir, log_dir, hardware
        self.attention_backend, self.startup_timeout = attention_backend, startup_timeout
        self.device, self.require_gpu = device, require_gpu
        self.extra_args = tuple(extra_args)  # --miles-sglang-args, for every SGLang engine
        self.placement = placement  # () -> RayCluster when --miles-placement=ray
        self.leaser = leaser  # GpuLeaser under pytest-xdist: engines start on GPUs no other worker holds
        self.leases: list[Any] = []
        self.request_timeout = request_timeout  # --miles-engine-request-timeout
        self.notes: list[str] = []  # engines replaced because they stopped answering
        self.launches = 0
        self.live: dict[tuple, Any] = {}
        atexit.register(self.close)  # also on KeyboardInterrupt, whatever pytest's teardown did

    def _device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self._hardware().nvidia else "cpu"

    def _need(self, kind: str) -> None:
        import pytest

        if importlib.util.find_spec("sglang") is None:
            msg = f"engine {kind!r} requires sglang (pip install 'pytest-miles[sglang]'); it is not installed"
        elif not self._hardware().nvidia:
            msg = f"engine {kind!r} requires an NVIDIA GPU; found {self._hardware().describe()}"
        else:
            return
        if self.require_gpu:
            pytest.fail(msg + " (--miles-require-gpu)", pytrace=False)
        pytest.skip(msg)

    def __call__(self, kind: str = "reference", *, model: str | None = None, deterministic: bool = True,
                 attention_backend: str | None = None, extra_args: tuple[str, ...] = (), alongside: bool = False,
                 **options: Any):
        """`alongside=True` keeps the live engines running (two configurations at once, e.g. to
        interleave throughput measurements); by default a new configuration replaces the live one."""
        from ..validation import check_engine_args

        check_engine_args(kind, KINDS, model=model, deterministic=deterministic, attention_backend=attention_backend,
                          extra_args=extra_args)
        if kind.startswith("sglang"):
            self._need(kind)
        backend = attention_backend or self.attention_backend
        extra_args = self.extra_args + tuple(extra_args)
        key = (kind, model, deterministic, backend, tuple(extra_args), tuple(sorted(options.items())))
        eng = self.live.get(key)
        if eng is not None and getattr(eng, "alive", True) and self._answers(eng):
            return eng
        if not alongside:
            self.close()  # a new configuration: free the old engine (and its GPU memory) first
        model_dir = model or self._model_dir()
        eng = self._make(kind, model_dir, deterministic, backend, tuple(extra_args), options)
        self.launches += 1
        self.live[key] = eng
        return eng

    def _make(self, kind, model_dir, deterministic, backend, extra_args, options):
        spec = EngineSpec(kind, str(model_dir), deterministic, backend, tuple(extra_args), dict(options),
                          self._device(), str(self.log_dir), self.startup_timeout, self.request_timeout)
        if self.placement is not None:  # a Ray actor on the cluster, the deterministic env in its runtime_env
            from ..cluster.actors import RayEngine

            return RayEngine(self.placement(), spec)
        if self.leaser is None or not spec.gpus:
            return make_engine(spec)
        lease = self.leaser.acquire(spec.gpus, owner=f"engine {kind}")
        if kind in ("sglang", "reference-server"):  # a subprocess: give it the leased GPUs
            spec = replace(spec, options={**spec.options, "env": {**spec.options.get("env", {}), **lease.env}})
        else:  # in-process: what it spawns inherits this process's environment
            os.environ.update(lease.env)
        try:
            eng = make_engine(spec)
        except BaseException:  # an engine that never started must not keep the GPU from other workers
            lease.release()
            raise
        self.leases.append(lease)
        return eng

    def _answers(self, eng: Any) -> bool:
        """Whether a live engine still answers its health check (a short timeout). A wedged one
        (stopped, deadlocked) would make every request of the next test wait the full request
        timeout: it is replaced, and the report says so."""
        healthy = getattr(eng, "responsive", None)
        if healthy is None or healthy(min(5.0, self.request_timeout)):
            return True
        import warnings

        note = (f"pytest-miles: the {eng.name} engine (pid {getattr(eng.proc, 'pid', '?')}, log {eng.log_path}) did "
                f"not answer its health check within {min(5.0, self.request_timeout):g} s; it was killed and replaced "
                "by a fresh engine")
        self.notes.append(note)
        warnings.warn(note, stacklevel=3)
        return False

    def close(self) -> None:
        live, self.live = self.live, {}
        try:
            for eng in live.values():
                eng.close()
        finally:
            leases, self.leases = self.leases, []
            for lease in leases:
                lease.release()
