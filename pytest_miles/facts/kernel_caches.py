"""Engine cold starts as measured, the start-up limits derived from them, and the one directory for
the JIT kernel caches a CI should keep between runs.

A fresh GPU host spends most of an SGLang start compiling kernels (FlashInfer: 185 of 270 s on an
H200; 238 of 314 s beside the suite's other servers); with the caches kept, the same engine starts
in 53-68 s. Limits are derived from the
measured cold start with a margin (never within 20% of it), so a slow cold start is not a failure,
and a start that does run out names the stage and how to warm the cache. See docs/ci.md."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

MARGIN = 1.5  # limit = MARGIN x the slowest measured cold start, at least MIN_START_LIMIT
MIN_START_LIMIT = 300.0
CACHE_ENV = "PYTEST_MILES_KERNEL_CACHE"


@dataclass(frozen=True)
class ColdStart:
    engine: str
    backend: str
    seconds: float  # the slowest cold start measured (empty kernel caches)
    jit_seconds: float | None  # of which compiling kernels
    warm_seconds: float | None  # the same engine with the caches kept
    where: str  # host, date, versions

    def describe(self) -> str:
        jit = f", {self.jit_seconds:.0f} s of it compiling kernels" if self.jit_seconds else ""
        warm = f"; {self.warm_seconds:.0f} s with warm kernel caches" if self.warm_seconds else ""
        return f"measured cold start {self.seconds:.0f} s{jit}{warm} ({self.where})"


COLD_STARTS = (
    # the slowest measured: started beside four other servers and the FlashInfer prebuild, its prefill-graph
    # capture waiting 238 s for FA3's module (alone, with nothing beside it: 270 s, 185 s compiling, 2026-12-03)
    ColdStart("sglang", "flashinfer", 314.0, 238.0, 68.0,
              "H200, 2026-12-04, sglang 0.5.17, flashinfer 0.6.15, the suite's negative-control engine"),
    ColdStart("sglang", "triton", 131.0, None, 51.0, "H100, 2026-11-23, sglang 0.5.17, triton 3.6.0"),
    ColdStart("reference-server", "any", 10.0, None, None, "2-core CPU runner, 2026-12-03"),
    ColdStart("reference", "any", 5.0, None, None, "2-core CPU runner, 2026-12-03 (in-process: loads the model)"),
)


def cold_start(engine: str, backend: str) -> ColdStart | None:
    return next((c for c in COLD_STARTS if c.engine == engine and c.backend in (backend, "any")), None)


def start_limit(engine: str, backend: str) -> float:
    """Seconds an engine of this configuration may take to become healthy: MARGIN x its measured cold
    start, at least MIN_START_LIMIT (an unmeasured configuration gets the larger of that and the
    slowest measured SGLang start with the margin)."""
    measured = cold_start(engine, backend)
    if measured is None:
        slowest = max(c.seconds for c in COLD_STARTS if c.engine == "sglang")
        return max(MIN_START_LIMIT, MARGIN * slowest)
    return max(MIN_START_LIMIT, MARGIN * measured.seconds)


def slow_start_advice(engine: str, backend: str) -> str:
    """What a start-up timeout message adds: the measured cold start and how to warm the cache."""
    measured = cold_start(engine, backend)
    facts = measured.describe() if measured else "no cold start measured for this configuration"
    return (f"{engine} ({backend}): {facts}. Most of a cold start compiles kernels: keep them between runs "
            f"by setting {CACHE_ENV} to a directory your CI caches (key: `pytest-miles doctor` prints it), "
            "or raise --miles-engine-timeout")


def cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """The directory from the environment (the `pytest-miles doctor` command; under pytest the
    setting --miles-kernel-cache-dir / miles_kernel_cache_dir / PYTEST_MILES_KERNEL_CACHE gives it)."""
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_env(root: str | Path | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that put every JIT cache an SGLang engine fills under the one directory
    (FlashInfer's workspace base, Triton's and TorchInductor's caches); empty without a directory.
    A variable the caller already set is left as it is."""
    environ = os.environ if environ is None else environ
    if not root:
        return {}
    root = Path(root).expanduser()
    wanted = {"FLASHINFER_WORKSPACE_BASE": root / "flashinfer", "TRITON_CACHE_DIR": root / "triton",
              "TORCHINDUCTOR_CACHE_DIR": root / "inductor"}
    return {k: str(v) for k, v in wanted.items() if k not in environ}


def cache_key(fingerprint: dict) -> str:
    """What a CI should key the cache directory on: the kernel-compiling packages' versions, the CUDA
    runtime and the GPU architecture (a cache built for another one is recompiled, not reused).
    `fingerprint`: `Fingerprint.to_json()`."""
    packages = fingerprint.get("packages") or {}
    parts = {k: packages.get(k) for k in ("sglang", "flashinfer-python", "torch", "triton")}
    gpu = (fingerprint.get("gpu_capability") or "cpu").replace("_", "")
    blob = json.dumps({**parts, "cuda": fingerprint.get("cuda_runtime"), "gpu": gpu}, sort_keys=True)
    return f"miles-kernels-{gpu}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _stamp(root: Path, key: str, engine: str, backend: str) -> Path:
    return root / "stamps" / f"{key}-{engine}-{backend}.json"


def mark_warm(root: str | Path | None, key: str, engine: str, backend: str, seconds: float) -> None:
    """After an engine started with the cache directory: the caches now hold its kernels. Only the
    stamp's name is ever read back (a cache restored from another machine is never parsed)."""
    if not root:
        return
    from pytest_miles._files import atomic_write

    atomic_write(_stamp(Path(root).expanduser(), key, engine, backend),
                 json.dumps({"start_seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d")}))


def warm_state(root: str | Path | None, key: str) -> tuple[str, str]:
    """('not set' | 'cold' | 'warm', what it means) for the doctor."""
    if not root:
        return "not set", (f"{CACHE_ENV} is not set: every fresh host compiles its kernels again "
                           f"(FlashInfer: minutes); set it to a directory your CI caches under key {key}")
    root = Path(root).expanduser()
    stamps = sorted((root / "stamps").glob(f"{key}-*.json")) if (root / "stamps").is_dir() else []
    if not stamps:
        return "cold", f"{root}: no engine of this stack has started with it yet (cache key {key})"
    names = ", ".join(p.stem.removeprefix(f"{key}-") for p in stamps)
    return "warm", f"{root}: kernels of {names} for this stack (cache key {key})"
