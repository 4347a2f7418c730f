"""Engine creation and reuse for the fixtures: one live engine per configuration."""

from __future__ import annotations

import atexit
import importlib.util
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_miles.engines.launch import EngineSpec, make_engine
from pytest_miles.errors import Unavailable


class EngineFactory:
    def __init__(self, *, model_dir: Callable[[], str], log_dir: Path, hardware: Callable[[], Any],
                 attention_backend: str = "flashinfer", startup_timeout: float | None = None, device: str = "auto",
                 extra_args: tuple[str, ...] = (),
                 start: Callable[[EngineSpec], Any] | None = None, leaser: Any = None,
                 request_timeout: float = 300.0, kernel_cache_dir: str | None = None,
                 cache_key: Callable[[], str] | None = None) -> None:
        self._model_dir, self.log_dir, self._hardware = model_dir, log_dir, hardware
        self.attention_backend, self.startup_timeout = attention_backend, startup_timeout
        self.device = device
        self.extra_args = tuple(extra_args)  # --miles-sglang-args, for every SGLang engine
        self.start = start  # spec -> engine started elsewhere (a Ray actor with --miles-placement=ray)
        self.leaser = leaser  # GpuLeaser under pytest-xdist: engines start on GPUs no other worker holds
        self.leases: list[Any] = []
        self.request_timeout = request_timeout  # --miles-engine-request-timeout
        # --miles-kernel-cache-dir: SGLang servers keep their JIT kernels there; after a start, a stamp
        # under the stack's cache key (the doctor's "warm") records it
        self.kernel_cache_dir, self._cache_key = kernel_cache_dir, cache_key
        self.notes: list[str] = []  # engines replaced because they stopped answering
        self.launches = 0
        self.live: dict[tuple, Any] = {}
        atexit.register(self.close)  # also on KeyboardInterrupt, whatever pytest's teardown did

    def model_path(self) -> str:
        """The model folder engines start from when a call names none (--miles-model or the shape's)."""
        return self._model_dir()

    def _device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self._hardware().nvidia else "cpu"

    def _need(self, kind: str) -> None:
        """SGLang engines need sglang and an NVIDIA GPU: Unavailable (a skip, a failure under
        --miles-require-gpu) otherwise."""
        if importlib.util.find_spec("sglang") is None:
            raise Unavailable(f"engine {kind!r} requires sglang (pip install 'pytest-miles[sglang]'); "
                              "it is not installed")
        if not self._hardware().nvidia:
            raise Unavailable(f"engine {kind!r} requires an NVIDIA GPU; found {self._hardware().describe()}")

    def __call__(self, kind: str = "reference", *, model: str | None = None, deterministic: bool = True,
                 attention_backend: str | None = None, extra_args: tuple[str, ...] = (), alongside: bool = False,
                 **options: Any):
        """`alongside=True` keeps the live engines running (two configurations at once, e.g. to
        interleave throughput measurements); by default a new configuration replaces the live one."""
        spec = self.spec(kind, model=model, deterministic=deterministic, attention_backend=attention_backend,
                         extra_args=extra_args, options=options)  # checked: a bad argument starts nothing
        if kind.startswith("sglang"):
            self._need(kind)
        key = (kind, model, deterministic, spec.attention_backend, spec.extra_args,
               tuple(sorted((k, _hashable(v)) for k, v in options.items())))
        eng = self.live.get(key)
        if eng is not None and getattr(eng, "alive", True) and self._answers(eng):
            return eng
        if not alongside:
            self.close()  # a new configuration: free the old engine (and its GPU memory) first
        eng = self._make(spec)
        self._mark_warm(spec, eng)
        self.launches += 1
        self.live[key] = eng
        return eng

    def spec(self, kind: Any, *, model: Any, deterministic: Any, attention_backend: Any, extra_args: Any,
             options: dict[str, Any]) -> EngineSpec:
        """The EngineSpec of one call: this factory's defaults filled in, every argument checked
        (by EngineSpec). --miles-sglang-args come first, so the call's own arguments win."""
        if isinstance(extra_args, (list, tuple)):  # anything else is refused by the spec, named
            extra_args = (*self.extra_args, *extra_args)
        backend = self.attention_backend if attention_backend is None else attention_backend
        timeout = self.startup_timeout
        if timeout is None:  # derived from the configuration's measured cold start, with a margin
            from pytest_miles.facts.kernel_caches import start_limit

            timeout = start_limit(str(kind), str(backend))
        options = dict(options) if isinstance(options, dict) else options
        if kind == "sglang" and self.kernel_cache_dir and isinstance(options, dict):
            options.setdefault("kernel_cache_dir", self.kernel_cache_dir)
        return EngineSpec(kind, self._model_dir() if model is None else model, deterministic, backend, extra_args,
                          options, self._device(), str(self.log_dir), timeout, self.request_timeout)

    def _make(self, spec: EngineSpec):
        if self.start is not None:  # a placement: e.g. a Ray actor, the deterministic env in its runtime_env
            return self.start(spec)
        if self.leaser is None or not spec.gpus:
            return make_engine(spec)
        lease = self.leaser.acquire(spec.gpus, owner=f"engine {spec.kind}")
        if spec.kind in ("sglang", "reference-server"):  # a subprocess: give it the leased GPUs
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

    def _mark_warm(self, spec: EngineSpec, eng: Any) -> None:
        seconds = getattr(eng, "startup_seconds", None)
        if (spec.kind == "sglang" and self.kernel_cache_dir and self._cache_key is not None and seconds
                and not spec.options.get("dump_hidden_states")):  # the dump engine captures no CUDA graphs
            from pytest_miles.facts.kernel_caches import mark_warm

            mark_warm(self.kernel_cache_dir, self._cache_key(), spec.kind, spec.attention_backend, seconds)

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


def _hashable(value: Any) -> Any:
    """An option's value as part of a configuration's key (env={...} is a dict)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, set)):
        return tuple(_hashable(v) for v in value)
    return value
