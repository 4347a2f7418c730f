"""Engines started in the background (`EngineFactory.prestart`): one thread per engine, the starts
staggered so that no two measure the GPU's free memory at the same time.

Why staggered: an SGLang server sizes its KV pool as `free memory after its weights load - free
memory before they load x (1 - mem_fraction_static)` (sglang model_runner `profile_max_num_token`).
A second server that allocates between those two readings of the first takes its share out of the
first one's pool, or makes it negative ("Not enough memory"). So a start begins only when the
previous one logged that its memory pool is allocated (`memory_marker`), answered, or failed; the
minutes of kernel compilation and CUDA-graph capture that follow overlap.

Waiting in that chain costs a whole SGLang start per server: on an H200 about 65 s from spawn to the
memory line, nearly all of it imports, for a reading window of about 4 s (2026-12-04). So a server
whose pool is fixed in tokens in advance starts at once, beside the others, with BESIDE_FRACTION:
- a pool capped small by its own `--max-total-tokens` (at most SMALL_POOL_BYTES: the suite's traffic
  and cache/API servers);
- the others, when their pools can be planned (`planned_pools`): SHARE of the GPU memory free now
  (NVML), in equal parts, each part in tokens of its model, passed as `--max-total-tokens`.
SGLang then takes min(what it profiles, the cap), and refuses to start ("Loaded weights leave no GPU
memory for the KV cache") when the memory free at its second reading is below `(1 - fraction) x the
first` (sglang mem_cache/kv_cache_configurator.py `_profile_available_bytes`). So a server started
beside the others needs, at its second reading, `(1 - BESIDE_FRACTION) x its first + its cap` free,
whatever the others allocated in between: at most SHARE of the memory in planned pools, 1 GiB per small
pool, and each GPU process's own memory (CUDA context, weights, graphs, workspaces; the suite's
megatron-core ranks start beside them too). On an H100 (2026-12-05) those others held 0.77 of the first
reading (two planned pools of 0.3 among them), and 0.75 refused a start. BESIDE_FRACTION 0.95 leaves
0.18 of the first reading (about 14 GB on an 80 GB card) beyond that, for a small pool's server as for a
planned one's (whose own cap of 0.3 then takes the place of the other planned pool's).
When the free memory or a model's KV layout is not known, the servers that keep SGLang's own sizing
stay in the chain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pytest_miles.errors import EngineError

DEFAULT_FRACTION = 0.3  # SGLangEngine's mem_fraction_static
SHARE = 0.6  # of the GPU memory free when the engines start, for all of them; the rest: trainers, graphs
SMALL_POOL_BYTES = 1 << 30  # a capped KV pool at most this large starts beside the chain
BESIDE_FRACTION = 0.95  # mem_fraction_static of a server started beside the chain (its pool is its cap)


def memory_fractions(n: int, share: float = SHARE, most: float = DEFAULT_FRACTION) -> list[float]:
    """mem_fraction_static for n SGLang servers started one after another on one GPU, each reading
    the memory free at its own start: server k gets `s / (1 - k*s)` of what is free then (s = share/n),
    which is s of what was free before the first, so together they hold `share` of it; never more
    than `most` (one or two servers keep the usual fraction)."""
    if n < 1:
        return []
    s = share / n
    return [round(min(most, s / (1 - k * s)), 4) for k in range(n)]


def kv_bytes_per_token(config: dict[str, Any], kv_cache_dtype: str | None = None) -> int | None:
    """Bytes of KV cache one token takes in an SGLang pool of this model (config.json; K and V, every
    layer), or None where the layout is not plain multi-head attention (MLA, hybrid layers)."""
    from pytest_miles.models.shapes import attention_layout

    att = attention_layout(config)
    if att.mla or att.mixed_layers or not (att.layers and att.kv_heads and att.head_dim):
        return None
    dtype = kv_cache_dtype if kv_cache_dtype not in (None, "auto") else att.dtype
    size = 1 if "fp8" in dtype or "int8" in dtype else 4 if dtype in ("float32", "fp32") else 2
    return 2 * att.layers * att.kv_heads * att.head_dim * size


def _kv_size(spec: Any) -> int | None:
    """kv_bytes_per_token of an SGLang spec's model folder, its --kv-cache-dtype applied, or None."""
    from pytest_miles.engines.base import sglang_arg
    from pytest_miles.models.embedded import read_hf_config

    try:
        config = read_hf_config(spec.model_dir)
    except (OSError, ValueError):
        return None
    return kv_bytes_per_token(config, sglang_arg(spec.extra_args, "kv-cache-dtype"))


def small_pool(spec: Any) -> bool:
    """Whether this SGLang server's KV pool is capped at most SMALL_POOL_BYTES (it starts beside the
    chain). `spec`: engines/launch.py EngineSpec."""
    from pytest_miles.engines.base import sglang_arg

    cap = sglang_arg(spec.extra_args, "max-total-tokens")
    if spec.kind != "sglang" or cap is None or not cap.isdigit():
        return False
    per_token = _kv_size(spec)
    return per_token is not None and int(cap) * per_token <= SMALL_POOL_BYTES


def planned_pools(specs: dict[Any, Any], free_bytes: int | None, share: float = SHARE) -> dict[Any, int]:
    """KV pool sizes in tokens for the SGLang servers that would take SGLang's own pool size (no
    `--max-total-tokens` of their own): `share` of the GPU memory free now, in equal parts of at most
    DEFAULT_FRACTION, each part in tokens of its model. With their pools fixed in advance they start
    at once, beside each other (given BESIDE_FRACTION), instead of one after another. When the free
    memory is not known, or one of them cannot be planned (a model layout not known here, the user's
    own --mem-fraction-static), none is: all stay in the chain. `specs`: key -> EngineSpec."""
    from pytest_miles.engines.base import sglang_arg

    if not free_bytes or free_bytes <= 0:
        return {}
    per_token: dict[Any, int] = {}
    for key, spec in specs.items():
        if spec.kind != "sglang" or sglang_arg(spec.extra_args, "max-total-tokens") is not None:
            continue
        size = None if sglang_arg(spec.extra_args, "mem-fraction-static") is not None else _kv_size(spec)
        if not size:  # the user's own sizing, or a layout not known here: all stay in the chain, planned together
            return {}
        per_token[key] = size
    part = min(DEFAULT_FRACTION, share / max(1, len(per_token))) * free_bytes  # at most the usual fraction
    return {key: int(part // size) for key, size in per_token.items()}


class Pending:
    """One engine starting in a thread of its own, after `after` (the previous start's memory settled)."""

    def __init__(self, label: str, build: Callable[[], Any], after: threading.Event | None, limit: float) -> None:
        self.label, self.limit = label, limit  # limit: seconds from now until the wait for it gives up
        self.asked = time.monotonic()
        self.settled, self.done = threading.Event(), threading.Event()
        self.engine: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.advice = ""  # what a timeout while waiting for it adds (the measured cold start, the cache)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(build, after), name=f"miles-prestart {label}",
                                       daemon=True)
        self.thread.start()

    def _run(self, build: Callable[[], Any], after: threading.Event | None) -> None:
        try:
            while after is not None and not after.wait(0.5) and not self.cancelled:
                pass
            with self._lock:
                if self.cancelled:
                    raise EngineError(f"{self.label}: closed before it started")
                self.engine = build()
            self.engine.start(settled=self.settled)
        except BaseException as exc:  # noqa: BLE001  (handed to the test that asks for this engine)
            self.error = exc
        finally:
            self.settled.set()
            self.done.set()

    def result(self) -> Any:
        """The started engine, or the error of its start (with the server's log tail); never waits
        past the limit: a start that has not ended by then is stopped and named."""
        remaining = self.asked + self.limit - time.monotonic()
        if not self.done.wait(max(remaining, 0.0)):
            self.cancel()
            where = getattr(self.engine, "log_path", None)
            from pytest_miles.placement.processes import tail

            raise EngineError(f"{self.label}, started in the background at session start, had not started "
                              f"{self.limit:.0f} s later (stage: engine start-up in the background; log {where})"
                              + (f"\n{tail(where)}" if where else ""))
        if self.error is not None:
            raise EngineError(f"{self.label}, started in the background at session start, failed: "
                              f"{self.error}") from self.error
        return self.engine

    def stop(self) -> None:
        """Mark it stopped (a start not begun never begins) and kill a start under way; no waiting.
        Stop every start of a chain, the last first, before waiting for any: stopping a start settles
        it, which lets the next one begin unless that one is already marked."""
        with self._lock:
            self.cancelled = True
            eng = self.engine
        if eng is not None:
            eng.cancel()

    def cancel(self) -> None:
        """Stop it and wait for its thread: a start under way is killed, one not begun never begins."""
        self.stop()
        self.thread.join(timeout=60)
        if self.engine is not None:  # started between the two looks
            self.engine.cancel()
