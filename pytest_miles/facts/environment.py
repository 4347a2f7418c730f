"""The deterministic environment of the Miles recipe, as one source of truth.

Three stacks must be deterministic at once: inference kernels (SGLang flags), training
kernels (torch/Megatron deterministic mode, cuBLAS workspace, TE) and NCCL (algorithm).
The env-var half goes to subprocesses and Ray workers via `deterministic_env_vars()`; the
in-process half (torch flags, seeds) is applied by `DeterministicEnvironment`.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

# Variable -> (value, why), from the Miles reproducibility guide's environment table.
DETERMINISTIC_ENV: dict[str, tuple[str, str]] = {
    "NCCL_ALGO": ("Ring", "forces a deterministic collective algorithm"),
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": ("0", "disables non-deterministic Transformer-Engine kernels"),
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", "cuBLAS's deterministic workspace allocation"),
}
# Values that are also deterministic (torch documents both cuBLAS workspace configs).
ACCEPTED_VALUES: dict[str, tuple[str, ...]] = {
    "NCCL_ALGO": ("Ring",),
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": ("0",),
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),
}
DETERMINISTIC_ATTENTION_BACKENDS = ("flashinfer", "fa3", "triton", "fa4")
DEFAULT_SEED = 1234


def deterministic_env_vars(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The env vars every subprocess and Ray worker of a deterministic run must see."""
    env = {k: v for k, (v, _) in DETERMINISTIC_ENV.items()}
    if extra is not None and (not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items())):
        from pytest_miles.errors import InputError

        raise InputError(f"deterministic_env_vars(extra={extra!r:.80}): expected a dict of variable name -> "
                         "string value")
    if extra:
        env.update(extra)
    return env


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back os.environ values saved as {name: old value or None (unset)}; empties `saved`."""
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    saved.clear()


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if loaded) and torch (if loaded) RNGs."""
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


def apply_torch_determinism(torch: Any) -> None:
    """torch's half: deterministic algorithms on, cuDNN deterministic, no autotuning."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass
class DeterministicEnvironment:
    """Applies the deterministic environment and restores what was there before.

    torch is imported here only if it is installed: applying determinism is the point.
    """

    seed: int = DEFAULT_SEED
    extra_env: dict[str, str] = field(default_factory=dict)
    _saved_env: dict[str, str | None] = field(default_factory=dict, init=False, repr=False)
    _saved_torch: tuple | None = field(default=None, init=False, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return deterministic_env_vars(self.extra_env)

    def __enter__(self) -> DeterministicEnvironment:
        for key, value in self.env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            self._saved_torch = (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark,
            )
            apply_torch_determinism(torch)
        seed_everything(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        restore_env(self._saved_env)
        if self._saved_torch is not None:
            import torch

            algos, warn_only, cudnn_det, cudnn_bench = self._saved_torch
            torch.use_deterministic_algorithms(algos, warn_only=warn_only)
            torch.backends.cudnn.deterministic = cudnn_det
            torch.backends.cudnn.benchmark = cudnn_bench
            self._saved_torch = None
