"""The doctor: the Miles reproducibility guide's troubleshooting table, run as checks before the symptoms appear.

Each finding names the symptom the guide attributes to it and the fix, read from the one
troubleshooting table (facts/troubleshooting.toml). Nothing here imports torch unless asked
(`import_torch=True`), so the pytest header can show a summary for free.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import asdict, dataclass

from pytest_miles.facts import troubleshooting
from pytest_miles.facts.environment import (
    ACCEPTED_VALUES,
    DETERMINISTIC_ATTENTION_BACKENDS,
    DETERMINISTIC_ENV,
)

OK, FAIL, SKIP = "ok", "fail", "skip"
INFO = "info"  # an explanation (what SGLang's deterministic mode sets), not a check


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | fail | skip | info
    detail: str
    symptom: str = ""
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status.upper():4}] {self.check}: {self.detail}"
        if self.status == FAIL:
            text += f"\n       symptom: {self.symptom}\n       fix: {self.fix}"
        return text


FA3_MODULES = ("flash_attn_3", "flash_attn_interface")


def _symptom_fix(check: str) -> tuple[str, str]:
    """(symptom with its cause, fix) of a check, from the troubleshooting table (facts/troubleshooting.toml)."""
    row = troubleshooting.for_doctor(check)
    return f"{row.symptom}: {row.cause}", row.fix


def check_env_var(name: str, environ: dict[str, str]) -> Finding:
    value = environ.get(name)
    symptom, fix = _symptom_fix(name)
    accepted = ACCEPTED_VALUES[name]
    if value is None:
        return Finding(name, FAIL, f"not set (deterministic: {' or '.join(accepted)})", symptom, fix)
    if value not in accepted:
        return Finding(name, FAIL, f"{value!r} is not deterministic (use {' or '.join(accepted)})",
                       symptom, fix)
    return Finding(name, OK, f"{value} ({DETERMINISTIC_ENV[name][1]})")


def check_flash_attention_3() -> Finding:
    found = []
    for mod in FA3_MODULES:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found.append(f"{mod} ({spec.origin})")
    if found:
        return Finding("flash-attention-3", FAIL, "importable: " + ", ".join(found),
                       *_symptom_fix("flash-attention-3"))
    return Finding("flash-attention-3", OK, "not importable")


def check_attention_backend(backend: str | None) -> Finding:
    if not backend:
        return Finding("sglang attention backend", SKIP, "not configured")
    if backend not in DETERMINISTIC_ATTENTION_BACKENDS:
        return Finding(
            "sglang attention backend", FAIL,
            f"{backend!r} has no deterministic mode (deterministic: {', '.join(DETERMINISTIC_ATTENTION_BACKENDS)})",
            *_symptom_fix("sglang attention backend"))
    return Finding("sglang attention backend", OK, f"{backend} (deterministic inference supported)")


def check_torch_deterministic(import_torch: bool = False) -> Finding:
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        try:
            import torch
        except ImportError:
            return Finding("torch deterministic algorithms", SKIP, "torch is not installed")
    if torch is None:
        return Finding("torch deterministic algorithms", SKIP,
                       "torch not imported in this process (the deterministic_env fixture turns them on)")
    if not torch.are_deterministic_algorithms_enabled():
        return Finding("torch deterministic algorithms", FAIL, "off in this process",
                       *_symptom_fix("torch deterministic algorithms"))
    return Finding("torch deterministic algorithms", OK, "on")


# Variables that only matter where an NVIDIA GPU runs (NCCL, Transformer-Engine, cuBLAS).
GPU_ONLY = frozenset({"NCCL_ALGO", "NVTE_ALLOW_NONDETERMINISTIC_ALGO", "CUBLAS_WORKSPACE_CONFIG"})


def not_applicable_without_gpu(finding: Finding) -> Finding:
    """A failing GPU-only variable on a machine without a GPU: not applicable here, said once."""
    if finding.status != FAIL or finding.check not in GPU_ONLY:
        return finding
    return Finding(finding.check, SKIP, f"{finding.detail}; matters only with NVIDIA GPUs (none here). "
                   f"For GPU runs: {finding.fix}")


def judge_env(env: dict[str, str], gpu: bool) -> list[Finding]:
    """The one rule for this machine's environment, used by the pytest header and by `pytest-miles
    doctor` alike: a wrong or missing variable fails, except a GPU-only one where no NVIDIA GPU
    is (`gpu=False`: the machine as discovered, or as `--miles-gpu-class` / `--gpu-class` says)."""
    findings = [check_env_var(name, env) for name in DETERMINISTIC_ENV]
    return findings if gpu else [not_applicable_without_gpu(f) for f in findings]


def run_doctor(environ: dict[str, str] | None = None, attention_backend: str | None = None,
               import_torch: bool = False, process_checks: bool = True, gpu: bool = True,
               env_vars: bool = True) -> list[Finding]:
    """All checks. `process_checks=False` leaves out those about this process's torch state,
    which mean nothing before a fixture applies the deterministic environment. `gpu=False`
    (no NVIDIA GPU here) reports the GPU-only variables as not applicable instead of failing.
    `env_vars=False`: this process's variables are not the run's (a runtime_env gives them)."""
    env = dict(os.environ if environ is None else environ)
    findings = [check_flash_attention_3()]
    if env_vars:
        findings += judge_env(env, gpu)
    findings.append(check_attention_backend(attention_backend))
    if process_checks:
        findings.append(check_torch_deterministic(import_torch))
    return findings


def summary(findings: list[Finding], hint: bool = True) -> str:
    """One line. `hint=False` inside the doctor's own output (which is what the hint points to)."""
    failing = [f.check for f in findings if f.status == FAIL]
    ok = sum(f.status == OK for f in findings)
    gpu_only = sum(f.status == SKIP and f.check in GPU_ONLY for f in findings)
    na = f", {gpu_only} GPU-only not applicable (no NVIDIA GPU)" if gpu_only else ""
    if not failing:
        return f"doctor: {ok} ok, 0 failing{na}"
    text = f"doctor: {ok} ok, {len(failing)} failing ({', '.join(failing)}){na}"
    return text + ("; run `pytest-miles doctor` for symptoms and fixes" if hint else "")


def as_json(findings: list[Finding]) -> dict:
    return {"ok": not any(f.status == FAIL for f in findings), "findings": [asdict(f) for f in findings]}
