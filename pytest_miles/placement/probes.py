"""What runs on a Ray worker: who it is, what it sees, and small deterministic computations.

Importable on every worker (pytest-miles must be installed there, as Miles' own code is); torch
is imported only inside the computations that need it.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def identity() -> dict[str, Any]:
    """Node id and IP, GPU ids Ray assigned, CUDA_VISIBLE_DEVICES, pid and host of this worker."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001  (no GPU resource on this node)
        gpu_ids = []
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
            "pid": os.getpid(), "gpu_ids": gpu_ids, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def worker_fingerprint() -> dict[str, Any]:
    """This worker's fingerprint (GPU, driver, libraries, determinism env), as the snapshots key it."""
    from pytest_miles.facts.fingerprint import collect
    from pytest_miles.facts.hardware import discover

    return collect(discover()).to_json()


def env_values(keys: list[str]) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in keys}


def call(fn, args: tuple, kwargs: dict, with_fingerprint: bool) -> dict[str, Any]:
    """Run `fn` and wrap its value with the worker's identity (and fingerprint)."""
    out: dict[str, Any] = {"identity": identity()}
    if with_fingerprint:
        out["fingerprint"] = worker_fingerprint()
    out["value"] = fn(*args, **kwargs)
    return out


# ---- deterministic computations for run_on_every_worker ------------------------------------


def matmul_digest(seed: int = 0, n: int = 256, device: str = "auto") -> str:
    """sha256 of a seeded n x n float32 matmul (on this worker's GPU when it has one)."""
    import hashlib

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    c = (a @ b).cpu().contiguous()
    return hashlib.sha256(c.numpy().tobytes()).hexdigest()


def tiny_forward_logprobs(seed: int = 1234, prompt_len: int = 16, device: str = "auto") -> list[float]:
    """Next-token logprobs of the embedded tiny model on a seeded prompt, batch-invariant mode."""
    import torch

    from pytest_miles.models.embedded import TinyConfig, TinyDecoder, init_weights

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TinyConfig(seed=seed)
    model = TinyDecoder(cfg, init_weights(cfg), device=device)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    positions = torch.arange(prompt_len, device=device)[None]
    mask = torch.ones(1, prompt_len, dtype=torch.bool, device=device)
    with torch.no_grad():
        logits, _ = model.step(ids, positions, mask)
    return torch.log_softmax(logits[0], dim=-1).cpu().tolist()
