"""GPU discovery and GPU classes, without importing torch.

Discovery order: an override (option/ini/env), NVML (nvidia-ml-py), `nvidia-smi`, and torch
only when it is already imported. `CUDA_VISIBLE_DEVICES` is honoured in every path, since
NVML and nvidia-smi list every GPU on the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# Marker name -> (compute capabilities, what the skip reason calls it).
GPU_CLASSES: dict[str, tuple[frozenset[tuple[int, int]], str]] = {
    "ampere": (frozenset({(8, 0), (8, 6), (8, 9)}), "ampere (sm_80/sm_86/sm_89)"),
    "hopper": (frozenset({(9, 0)}), "hopper (sm_90)"),
    "blackwell": (frozenset({(10, 0), (10, 3)}), "blackwell (sm_100/sm_103)"),
    "blackwell_consumer": (frozenset({(12, 0)}), "blackwell_consumer (sm_120)"),
}

# Models the override understands: name -> (marketing name, capability, memory GiB, vendor).
GPU_MODELS: dict[str, tuple[str, tuple[int, int], float, str]] = {
    "a100": ("NVIDIA A100", (8, 0), 80.0, "nvidia"),
    "a10": ("NVIDIA A10", (8, 6), 24.0, "nvidia"),
    "l4": ("NVIDIA L4", (8, 9), 24.0, "nvidia"),
    "l40s": ("NVIDIA L40S", (8, 9), 48.0, "nvidia"),
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 80.0, "nvidia"),
    "h200": ("NVIDIA H200", (9, 0), 141.0, "nvidia"),
    "b200": ("NVIDIA B200", (10, 0), 180.0, "nvidia"),
    "b300": ("NVIDIA B300", (10, 3), 270.0, "nvidia"),
    "gb200": ("NVIDIA GB200", (10, 0), 186.0, "nvidia"),
    "gb300": ("NVIDIA GB300", (10, 3), 279.0, "nvidia"),
    "rtx5090": ("NVIDIA GeForce RTX 5090", (12, 0), 32.0, "nvidia"),
    "mi300x": ("AMD Instinct MI300X", (9, 4), 192.0, "amd"),
    "mi325x": ("AMD Instinct MI325X", (9, 4), 256.0, "amd"),
    "mi355x": ("AMD Instinct MI355X", (9, 5), 288.0, "amd"),
}
CLASS_DEFAULT_MODEL = {
    "ampere": "a100",
    "hopper": "h100",
    "blackwell": "b200",
    "blackwell_consumer": "rtx5090",
}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gib: float
    vendor: str = "nvidia"
    uuid: str = ""

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def gpu_class(self) -> str | None:
        if self.vendor != "nvidia":
            return None
        for name, (caps, _) in GPU_CLASSES.items():
            if self.capability in caps:
                return name
        return None


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...] = ()
    source: str = "none"
    driver: str | None = None
    cuda_driver: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def nvidia(self) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.vendor == "nvidia")

    def describe(self) -> str:
        """"1 x NVIDIA A100 (sm_80)" or "no NVIDIA GPU" (AMD devices named too)."""
        if not self.gpus:
            return "no NVIDIA GPU"
        groups: dict[tuple[str, str], int] = {}
        for g in self.gpus:
            key = (g.name, g.sm if g.vendor == "nvidia" else f"gfx {g.capability[0]}.{g.capability[1]}")
            groups[key] = groups.get(key, 0) + 1
        text = ", ".join(f"{n} x {name} ({sm})" for (name, sm), n in groups.items())
        if not self.nvidia:
            text = f"no NVIDIA GPU ({text})"
        return text


MAX_OVERRIDE_GPUS = 1024  # a pretended machine: more is a typo, and each GPU is an object in memory


def parse_override(value: str) -> Hardware:
    """`hopper`, `h100`, `h100x8`, `a100:2`, `none` -> a synthetic Hardware."""
    if not isinstance(value, str):
        raise ValueError(f"GPU class override {value!r:.60}: expected a string naming a class or model with an "
                         "optional count, e.g. hopper, h100x8, none")
    text = value.strip().lower()
    if text in ("none", "cpu", "0", ""):
        return Hardware(source=f"override ({value})")
    name, count = text, 1
    m = re.fullmatch(r"([a-z0-9_]+?)[x:*](\d+)", text)
    if text not in GPU_MODELS and text not in GPU_CLASSES and m:
        name, count = m.group(1), int(m.group(2))
    if not re.fullmatch(r"[a-z0-9_]+", name) or not 1 <= count <= MAX_OVERRIDE_GPUS:
        raise ValueError(f"GPU class override {value!r}: expected a class or model with an optional count of 1 to "
                         f"{MAX_OVERRIDE_GPUS}, e.g. hopper, h100x8")
    model = CLASS_DEFAULT_MODEL.get(name, name)
    if model not in GPU_MODELS:
        known = ", ".join(list(GPU_CLASSES) + ["none"] + list(GPU_MODELS))
        raise ValueError(f"GPU class override {value!r}: unknown {name!r}; known: {known}")
    full, cap, mem, vendor = GPU_MODELS[model]
    gpus = tuple(Gpu(i, full, cap, mem, vendor) for i in range(count))
    return Hardware(gpus=gpus, source=f"override ({value})")


def _visible_filter(gpus: list[Gpu], environ: dict[str, str]) -> list[Gpu]:
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return gpus
    chosen: list[Gpu] = []
    for token in [t.strip() for t in cvd.split(",") if t.strip()]:
        if token.lstrip("-").isdigit():
            idx = int(token)
            if idx < 0:
                break  # CUDA stops at the first invalid id
            match = [g for g in gpus if g.index == idx]
        else:
            match = [g for g in gpus if g.uuid and g.uuid.startswith(token)]
        if not match:
            break
        chosen.append(match[0])
    return [
        Gpu(i, g.name, g.capability, g.memory_gib, g.vendor, g.uuid) for i, g in enumerate(chosen)
    ]


@contextlib.contextmanager
def _nvml():
    """pynvml, initialised, and shut down afterwards; None where it is not installed or has no driver."""
    try:
        import pynvml  # nvidia-ml-py: ctypes only, cheap

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpu_free_bytes(uuid: str | None) -> int | None:
    """The free memory of the GPU with this UUID, now (NVML: what every process holds counted), or None
    where NVML cannot say."""
    if not uuid:
        return None
    with _nvml() as pynvml:
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid)).free)
        except Exception:  # no NVML (None), no such GPU
            return None


def _from_nvml() -> Hardware | None:
    with _nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                cap = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
                mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
                gpus.append(Gpu(i, name, (int(cap[0]), int(cap[1])), round(mem, 1), "nvidia", uuid))
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda_text = f"{cuda // 1000}.{(cuda % 1000) // 10}"
            return Hardware(tuple(gpus), "nvml", driver, cuda_text)
        except Exception as exc:  # a broken driver is a finding, not a crash
            return Hardware(source="nvml", notes=(f"NVML error: {exc}",))


def _from_nvidia_smi() -> Hardware | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    query = "index,uuid,name,compute_cap,memory.total,driver_version"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return Hardware(source="nvidia-smi", notes=(f"nvidia-smi failed: {exc}",))
    gpus, driver = [], None
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        major, _, minor = parts[3].partition(".")
        gpus.append(Gpu(int(parts[0]), parts[2], (int(major), int(minor or 0)),
                        round(float(parts[4]) / 1024, 1), "nvidia", parts[1]))
        driver = parts[5]
    return Hardware(tuple(gpus), "nvidia-smi", driver, None)


def _from_torch() -> Hardware | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return Hardware(source="torch")
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
            gpus.append(Gpu(i, p.name, (p.major, p.minor), round(p.total_memory / 2**30, 1), vendor))
        return Hardware(tuple(gpus), "torch")  # torch already honours CUDA_VISIBLE_DEVICES
    except Exception as exc:
        return Hardware(source="torch", notes=(f"torch.cuda error: {exc}",))


def discover(override: str | None = None, environ: dict[str, str] | None = None,
             use_torch: bool = False) -> Hardware:
    """What GPUs this process may use. `use_torch` imports torch if nothing else answers."""
    env = os.environ if environ is None else environ
    if override:
        return parse_override(override)
    notes: list[str] = []
    # No /dev/nvidiactl on Linux: no NVIDIA driver, so no process here can use CUDA; skip the
    # NVML/nvidia-smi probes (they cost tens of ms that every CPU-only test run would pay).
    driver_present = sys.platform != "linux" or os.path.exists("/dev/nvidiactl")
    for probe in (_from_nvml, _from_nvidia_smi) if driver_present else ():
        hw = probe()
        if hw is None:
            continue
        if hw.gpus:
            gpus = _visible_filter(list(hw.gpus), env)
            return Hardware(tuple(gpus), hw.source, hw.driver, hw.cuda_driver, hw.notes)
        notes.extend(hw.notes)
    if use_torch and "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
    hw = _from_torch()
    if hw is not None and hw.gpus:
        return hw
    return Hardware(source="none", notes=tuple(notes))


# ---- marker requirements ------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    classes: tuple[str, ...] = ()
    count: int = 0
    min_memory_gib: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.classes or self.count or self.min_memory_gib)

    def describe(self) -> str:
        n = max(self.count, 1)
        if self.classes:
            head = ("" if n == 1 else f"{n} x ") + " or ".join(GPU_CLASSES[c][1] for c in self.classes)
        else:
            head = "an NVIDIA GPU" if n == 1 else f"{n} NVIDIA GPUs"
        if self.min_memory_gib:
            head += f" with >= {self.min_memory_gib:g} GiB"
        return head

    def unmet(self, hw: Hardware) -> str | None:
        """None when the hardware satisfies this requirement, else the skip reason."""
        fit = [
            g for g in hw.nvidia
            if (not self.classes or g.gpu_class in self.classes) and g.memory_gib >= self.min_memory_gib
        ]
        if len(fit) >= max(self.count, 1):
            return None
        return f"requires {self.describe()}; found {hw.describe()}"


def requirement_from_marks(marks) -> Requirement:
    """Fold `gpu`, `gpus(n)`, `min_gpu_memory(gib)` and class markers into one requirement."""
    classes: list[str] = []
    count, memory = 0, 0.0
    for mark in marks:
        if mark.name in GPU_CLASSES:
            classes.append(mark.name)
        elif mark.name == "gpu":
            count = max(count, 1)
        elif mark.name == "gpus":
            n = mark.args[0] if mark.args else mark.kwargs.get("n", 1)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"@pytest.mark.gpus({n!r}): expected a positive integer")
            count = max(count, n)
        elif mark.name == "min_gpu_memory":
            gib = mark.args[0] if mark.args else mark.kwargs.get("gib")
            if not isinstance(gib, (int, float)) or gib <= 0:
                raise ValueError(f"@pytest.mark.min_gpu_memory({gib!r}): expected GiB as a positive number")
            memory = max(memory, float(gib))
    ordered = tuple(c for c in GPU_CLASSES if c in classes)
    return Requirement(ordered, count, memory)
