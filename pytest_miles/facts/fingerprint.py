"""The fingerprint: every fact that decides whether two runs can be bitwise equal.

Collected without importing torch: versions come from installed distributions' metadata and
the GPU facts from `hardware.discover`. Records made on one machine (snapshots, manifests)
are keyed on `digest`, which covers only the fields that decide bitwise results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field

from pytest_miles.facts.environment import DETERMINISTIC_ENV
from pytest_miles.facts.hardware import Hardware

PACKAGES = (
    "torch", "sglang", "sglang-kernel", "sgl-kernel", "flashinfer-python", "megatron-core",
    "transformer-engine", "ray", "triton",
)
# Fields whose difference can change bits; the rest (python, platform, memory) is context.
BITWISE_FIELDS = (
    "gpu_name", "gpu_capability", "gpu_count", "driver", "cuda_runtime", "cudnn", "nccl", "packages", "env",
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Versions of the named distributions from one pass over sys.path's dist-info folders."""
    wanted = {_norm(n): n for n in names}
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if not item.endswith((".dist-info", ".egg-info")):
                continue
            stem = item.rsplit(".", 1)[0]
            dist, _, version = stem.partition("-")
            key = _norm(dist)
            if key in wanted and wanted[key] not in found and version:
                found[wanted[key]] = version
    return {n: found.get(n) for n in names}


def _short(version: str | None, parts: int = 3) -> str | None:
    if not version:
        return None
    return ".".join(version.split("+")[0].split(".")[:parts])


def _torch_cuda_runtime() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return getattr(torch.version, "cuda", None)
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


_LIBS = ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "nvidia-nccl-cu13", "nvidia-nccl-cu12")


def _library_versions(libs: dict[str, str | None]) -> tuple[str | None, str | None]:
    """cuDNN and NCCL: from their wheels' metadata, else from torch if it is already loaded."""
    cudnn = _short(libs["nvidia-cudnn-cu13"] or libs["nvidia-cudnn-cu12"])
    nccl = _short(libs["nvidia-nccl-cu13"] or libs["nvidia-nccl-cu12"])
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if cudnn is None and torch.backends.cudnn.is_available():
                v = torch.backends.cudnn.version()
                cudnn = f"{v // 10000}.{(v % 10000) // 100}.{v % 100}" if v >= 10000 else str(v)
            if nccl is None and torch.cuda.is_available():
                nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:
            pass
    return cudnn, nccl


@dataclass(frozen=True)
class Fingerprint:
    gpu_name: str | None
    gpu_capability: str | None
    gpu_count: int
    gpu_memory_gib: float | None
    driver: str | None
    cuda_driver: str | None
    cuda_runtime: str | None
    cudnn: str | None
    nccl: str | None
    python: str
    platform: str
    hardware_source: str
    packages: dict[str, str | None] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)
    cpu: str | None = None  # model and vector ISA: CPU kernels dispatch on it (decides bits of CPU runs)

    @property
    def digest(self) -> str:
        data = {k: getattr(self, k) for k in BITWISE_FIELDS}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {**asdict(self), "digest": self.digest}

    def header(self) -> str:
        if self.gpu_name:
            gpu = f"{self.gpu_count} x {self.gpu_name} ({self.gpu_capability})"
            gpu += f", driver {self.driver}" if self.driver else f" [{self.hardware_source}]"
        else:
            gpu = "no NVIDIA GPU"
        libs = " ".join(f"{k} {v}" for k, v in (("CUDA", self.cuda_runtime), ("cuDNN", self.cudnn),
                                                   ("NCCL", self.nccl)) if v)
        pkgs = ", ".join(f"{k} {v}" for k, v in self.packages.items() if v)
        return " | ".join(p for p in (gpu, libs, pkgs, f"fingerprint {self.digest}") if p)


def collect(hardware: Hardware, environ: dict[str, str] | None = None) -> Fingerprint:
    env = os.environ if environ is None else environ
    first = hardware.nvidia[0] if hardware.nvidia else (hardware.gpus[0] if hardware.gpus else None)
    versions = installed_versions(PACKAGES + _LIBS)
    cudnn, nccl = _library_versions(versions)
    return Fingerprint(
        gpu_name=first.name if first else None,
        gpu_capability=first.sm if first else None,
        gpu_count=len(hardware.gpus),
        gpu_memory_gib=first.memory_gib if first else None,
        driver=hardware.driver,
        cuda_driver=hardware.cuda_driver,
        cuda_runtime=_torch_cuda_runtime(),
        cudnn=cudnn,
        nccl=nccl,
        python=platform.python_version(),
        platform=f"{platform.system()}-{platform.machine()}",
        hardware_source=hardware.source,
        packages={k: versions[k] for k in PACKAGES},
        env={k: env.get(k) for k in DETERMINISTIC_ENV},
        cpu=cpu_model(),
    )


def cpu_model() -> str | None:
    """`Intel(R) Xeon(R) ... [avx2 avx512f amx]` from /proc/cpuinfo (None where there is none)."""
    try:
        text = open("/proc/cpuinfo").read(200_000)
    except OSError:
        return platform.processor() or None
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name or 'unknown CPU'} [{' '.join(isa) or 'no avx2'}]"
