"""Engine creation and reuse for the fixtures: one live engine per configuration."""

from __future__ import annotations

import atexit
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

KINDS = ("reference", "reference-server", "sglang", "sglang-offline")


class EngineFactory:
    def __init__(self, *, model_dir: Callable[[], str], log_dir: Path, hardware: Callable[[], Any],
                 attention_backend: str = "flashinfer", startup_timeout: float = 300.0, device: str = "auto",
                 require_gpu: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self._model_dir, self.log_dir, self._hardware = model_dir, log_dir, hardware
        self.attention_backend, self.startup_timeout = attention_backend, startup_timeout
        self.device, self.require_gpu = device, require_gpu
        self.extra_args = tuple(extra_args)  # --miles-sglang-args, for every SGLang engine
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
                 attention_backend: str | None = None, extra_args: tuple[str, ...] = (), **options: Any):
        if kind not in KINDS:
            raise ValueError(f"engine kind {kind!r}: expected one of {', '.join(KINDS)}")
        if kind.startswith("sglang"):
            self._need(kind)
        backend = attention_backend or self.attention_backend
        extra_args = self.extra_args + tuple(extra_args)
        key = (kind, model, deterministic, backend, tuple(extra_args), tuple(sorted(options.items())))
        eng = self.live.get(key)
        if eng is not None and getattr(eng, "alive", True):
            return eng
        self.close()  # a new configuration: free the old engine (and its GPU memory) first
        model_dir = model or self._model_dir()
        eng = self._make(kind, model_dir, deterministic, backend, tuple(extra_args), options)
        self.launches += 1
        self.live[key] = eng
        return eng

    def _make(self, kind, model_dir, deterministic, backend, extra_args, options):
        if kind == "reference":
            from .reference import ReferenceEngine

            return ReferenceEngine(model_dir, batch_invariant=deterministic, device=self._device(), **options)
        if kind == "reference-server":
            from .server import ReferenceServerEngine

            return ReferenceServerEngine(model_dir, batch_invariant=deterministic, device=self._device(),
                                         log_dir=self.log_dir, **options).start()
        if kind == "sglang":
            from .server import SGLangEngine

            return SGLangEngine(model_dir, deterministic=deterministic, attention_backend=backend,
                                extra_args=extra_args, log_dir=self.log_dir, startup_timeout=self.startup_timeout,
                                **options).start()
        from .sglang_offline import SGLangOfflineEngine

        return SGLangOfflineEngine(model_dir, deterministic=deterministic, attention_backend=backend, **options)

    def close(self) -> None:
        live, self.live = self.live, {}
        for eng in live.values():
            eng.close()
