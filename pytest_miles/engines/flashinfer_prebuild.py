"""FlashInfer's JIT modules that SGLang servers will build at first use, built side by side in a
process of their own while those servers start (the suite's cold start on a fresh GPU host).

Why: an SGLang server builds FlashInfer's modules one after another, as its CUDA-graph capture and
its warm-up meet them. The suite's servers of the tiny model met six of them: prefill (FA3 on Hopper,
ragged), prefill (FA2, paged), decode without tensor cores, norm, cascade and sampling.
On a cold H200 that server took 270 s to start, 185 s of it compiling (2026-12-03, flashinfer
0.6.15), and its prefill-graph capture alone 190 s (2026-12-04). Ninja builds the files of one
module in parallel, but the modules themselves are built one at a time. Per file (H200 host, 16
cores, 2026-12-04, ninja's own log): each of FA3's ten files 65-100 s, `sampling.cu` alone 129 s,
FA2's files 12-44 s, norm 38 s.

This process builds them all at once, each module's ninja with its usual job count (a share of the
CPUs each made FA3's ten files wait in three rounds: 264 s, 2026-12-04). It takes the per-module
file lock that FlashInfer takes (`flashinfer/jit/core.py`, `JitSpec.build_and_load`). A server that
reaches a module still being built waits for the lock, then loads it; a module already built loads
at once. What the servers run does not change: the module names are FlashInfer's own. The arguments
are derived as SGLang 0.5.17's FlashInfer backend derives them
(`sglang/srt/layers/attention/flashinfer_backend.py`):
- ragged prefill on backend "auto", paged prefill on "fa2";
- decode on tensor cores (the FA2 prefill module) with determinism on, or for GQA groups of 4 or
  more, else the decode module;
- FlashInfer sampling only with determinism off, since the flag forces PyTorch sampling;
- norm and cascade for every FlashInfer server (both were built by the suite's servers).

It is best effort. Anything it cannot derive for certain is left to the server, which builds it as
before, and the build's stage line says why: a KV-cache dtype other than the model's, a sliding window, other
attention backends for prefill or decode, or a dtype other than bf16/fp16.

    python -m pytest_miles.engines.flashinfer_prebuild '<modules as JSON>'

writes one JSON line per module: {"module", "state": "built" | "was built" | "failed: ...", "seconds"},
then {"done": seconds} for the whole build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float16")
PLAIN = ("norm", "cascade", "sampling")  # modules without template arguments


@dataclass(frozen=True)
class Module:
    """One FlashInfer JIT module, as the arguments that name it."""

    kind: str  # "prefill" | "decode" | "sampling" | "norm" | "cascade"
    backend: str = ""  # prefill: "auto" (FlashInfer picks, as for SGLang's ragged wrapper) or "fa2"
    dtype: str = ""  # q, kv and o alike
    head_dim: int = 0

    def describe(self) -> str:
        if self.kind in PLAIN:
            return self.kind
        return f"{self.kind} ({self.backend or 'decode'}, {self.dtype}, head_dim {self.head_dim})"


def modules_for(config: dict[str, Any], *, deterministic: bool, attention_backend: str,
                extra_args: tuple[str, ...] = (),
                environ: dict[str, str] | None = None) -> tuple[list[Module], list[str]]:
    """(the modules an SGLang server of this model and configuration will build, what is left to the
    server and why). `config`: the model's config.json."""
    from pytest_miles.engines.base import sglang_arg
    from pytest_miles.models.shapes import attention_layout

    environ = os.environ if environ is None else environ
    if attention_backend != "flashinfer":
        return [], [f"attention backend {attention_backend}: not FlashInfer"]
    sampling = sglang_arg(extra_args, "sampling-backend") or "flashinfer"
    mods: list[Module] = [Module("norm"), Module("cascade")]
    if not deterministic and sampling == "flashinfer":
        mods.append(Module("sampling"))
    att = attention_layout(config)
    dtype = sglang_arg(extra_args, "dtype") or "auto"
    dtype = att.dtype if dtype == "auto" else dtype
    dtype = {"bf16": "bfloat16", "half": "float16", "fp16": "float16"}.get(dtype, dtype)
    heads, kv_heads, head_dim = att.heads, att.kv_heads, att.head_dim
    reasons = []
    if (sglang_arg(extra_args, "kv-cache-dtype") or "auto") != "auto":
        reasons.append("a KV-cache dtype of its own")
    if att.sliding_window or att.mixed_layers:
        reasons.append("sliding-window or mixed attention layers")
    for phase in ("prefill", "decode"):
        other = sglang_arg(extra_args, f"{phase}-attention-backend")
        if other and other != "flashinfer":
            reasons.append(f"{phase} on {other}")
    if dtype not in DTYPES:
        reasons.append(f"dtype {dtype}")
    if not (heads and kv_heads and head_dim):
        reasons.append("no attention head counts in config.json")
    if reasons:
        return mods, [f"attention modules: {', '.join(reasons)}"]
    mods += [Module("prefill", "auto", dtype, head_dim), Module("prefill", "fa2", dtype, head_dim)]
    override = environ.get("SGLANG_FLASHINFER_USE_TENSOR_CORE")
    tensor_cores = deterministic or (override.lower() == "true" if override is not None else heads // kv_heads >= 4)
    if not tensor_cores:  # with tensor cores, decode runs the FA2 prefill module above
        mods.append(Module("decode", "", dtype, head_dim))
    return mods, []


def plan(servers: list[tuple[dict[str, Any], bool, str, tuple[str, ...], dict[str, str] | None]],
         environ: dict[str, str] | None = None) -> tuple[list[Module], list[str]]:
    """The modules of several servers (config, deterministic, attention backend, extra args, the
    server's own environment or None for `environ`), once each, in the order the servers meet them
    (prefill first, sampling last), and what is left."""
    mods: list[Module] = []
    left: list[str] = []
    for config, deterministic, backend, extra, own in servers:
        m, why = modules_for(config, deterministic=deterministic, attention_backend=backend,
                             extra_args=extra, environ=environ if own is None else own)
        mods += [x for x in m if x not in mods]
        left += [w for w in why if w not in left]
    order = {"prefill": 0, "decode": 1, "norm": 2, "cascade": 3, "sampling": 4}
    return sorted(mods, key=lambda x: order[x.kind]), left


class Prebuild:
    """The build process, owned (it dies with pytest), and what it reported."""

    def __init__(self, modules: list[Module], *, env: dict[str, str], log_path: Path, left: list[str] = ()) -> None:
        from pytest_miles.placement.ownership import spawn

        self.modules, self.log_path, self.left = modules, Path(log_path), list(left)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = spawn([sys.executable, "-m", "pytest_miles.engines.flashinfer_prebuild",
                               json.dumps([asdict(m) for m in modules])], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
        self.seconds: float | None = None
        self.noted = False

    def finished(self) -> bool:
        if self.proc.poll() is None:
            return False
        if self.seconds is None:  # the build's own figure; when it is missing, the time until this look
            done = [r["done"] for r in self._rows() if isinstance(r.get("done"), (int, float))]
            self.seconds = float(done[-1]) if done else time.monotonic() - self.t0
        return True

    def _rows(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def results(self) -> list[dict[str, Any]]:
        return [r for r in self._rows() if "module" in r]

    def summary(self) -> str:
        rows = self.results()
        parts = [f"{r['module']}: {r['state']} in {float(r.get('seconds', 0)):.0f} s" for r in rows]
        left = f"; left to the servers: {', '.join(self.left)}" if self.left else ""
        return ("; ".join(parts) or f"no module reported (log {self.log_path})") + left

    def stop(self) -> None:
        from pytest_miles.placement.ownership import disown
        from pytest_miles.placement.processes import kill_tree

        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001  (a tree already gone; nothing is left to wait for)
            pass
        disown(self.proc.pid)


def start_for(specs: list[Any], *, kernel_cache_dir: str | None, log_dir: str | Path) -> Prebuild | None:
    """The build process for these SGLang server specs (engines/launch.py EngineSpec), or None when
    they need no FlashInfer module this can derive, or FlashInfer is not installed."""
    import importlib.util

    from pytest_miles.engines.base import sglang_start_env
    from pytest_miles.facts.kernel_caches import cache_env
    from pytest_miles.models.embedded import read_hf_config

    if not specs or importlib.util.find_spec("flashinfer") is None:
        return None
    servers = []
    for spec in specs:
        try:
            config = read_hf_config(spec.model_dir)
        except (OSError, ValueError):
            continue
        own = spec.options.get("env") if isinstance(spec.options.get("env"), dict) else {}
        servers.append((config, spec.deterministic, spec.attention_backend, spec.extra_args,
                        {**os.environ, **own}))  # each server's modules as its own environment chooses them
    modules, left = plan(servers)
    if not modules:
        return None
    env = {**os.environ, **sglang_start_env(), **cache_env(kernel_cache_dir)}  # where the servers keep kernels
    return Prebuild(modules, env=env, log_path=Path(log_dir) / "flashinfer-prebuild.log", left=left)


# ---- the build process ---------------------------------------------------------------------------


def _spec(m: Module) -> Any:
    import torch
    from flashinfer import jit

    if m.kind in PLAIN:
        import importlib

        return getattr(importlib.import_module(f"flashinfer.jit.{m.kind}"), f"gen_{m.kind}_module")()
    dt = getattr(torch, m.dtype)
    if m.kind == "decode":
        return jit.gen_batch_decode_module(dt, dt, dt, torch.int32, m.head_dim, m.head_dim, 0, False, False)
    backend = m.backend
    if backend == "auto":
        from flashinfer.utils import determine_attention_backend

        backend = determine_attention_backend(torch.device("cuda"), 0, False, False, dt, dt,
                                              head_dim_qk=m.head_dim, head_dim_vo=m.head_dim)
    return jit.gen_batch_prefill_module(backend, dt, dt, dt, torch.int32, m.head_dim, m.head_dim, 0, False, False,
                                        False)


def _build(name: str, spec: Any) -> None:
    t0 = time.monotonic()
    try:
        if getattr(spec, "is_aot", False):
            state = "was built (ahead of time)"
        elif spec.jit_library_path.exists():
            state = "was built"
        else:
            spec.build(verbose=False)  # under the module's file lock, as a server's build_and_load takes it
            state = "built"
    except Exception as exc:  # noqa: BLE001  (the server builds it then, as it would have)
        state = f"failed: {type(exc).__name__}: {str(exc).strip()[-400:]}"
    _report(name, state, time.monotonic() - t0)


def _report(name: str, state: str, seconds: float) -> None:
    print(json.dumps({"module": name, "state": state, "seconds": round(seconds, 1)}), flush=True)


def main(argv: list[str]) -> int:
    try:
        modules = [Module(**m) for m in json.loads(argv[0])]
    except (IndexError, ValueError, TypeError) as exc:
        print(f"flashinfer_prebuild: expected one argument, a JSON list of modules; {exc}", file=sys.stderr)
        return 2
    try:
        import flashinfer.jit  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        _report("*", f"failed: not installed ({exc})", 0.0)
        return 0
    # The sources are generated here, one module after another (fast); only the builds run side by
    # side, one thread per module name (FlashInfer's file lock is re-entrant within one process).
    specs: dict[str, Any] = {}
    for m in modules:
        try:
            spec = _spec(m)
        except Exception as exc:  # noqa: BLE001
            _report(m.describe(), f"failed: {type(exc).__name__}: {str(exc).strip()[-400:]}", 0.0)
            continue
        specs.setdefault(spec.name, spec)
    t0 = time.monotonic()
    threads = [threading.Thread(target=_build, args=item) for item in specs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"done": round(time.monotonic() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
