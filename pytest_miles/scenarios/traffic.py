"""Production-like traffic against one served engine: N concurrent clients with seeded arrival
times, prompt and output lengths and per-request sampling parameters (greedy next to sampled,
temperature, top-k, top-p, min-p, each with its own seed), streaming and non-streaming. Then
every request alone on a flushed engine, and a second run with another arrival order;
checks/traffic.py judges. The engine needs `generate_one(prompt, params, top_logprobs=, stream=)`
and `flush_cache()`; `metrics()` (Prometheus /metrics) gives the witnesses."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from pytest_miles.checks.compositions import boundary_lengths
from pytest_miles.checks.traffic import (
    EXPLANATIONS,
    FeatureReport,
    TrafficReport,
    compare_traffic,
    first_difference,
    judge_control,
    judge_traffic,
)
from pytest_miles.checks.witness import engine_settings
from pytest_miles.engines.base import Output, SamplingParams
from pytest_miles.errors import InputError
from pytest_miles.recording import recorded

# Witness -> the /metrics names that carry it, first found wins. SGLang 0.5.17 (observability/
# metrics_collector.py) has the retraction counter, cached_tokens_total and num_running_reqs; the
# others are the embedded server's own (SGLang counts no chunked prefills: see _witness_delta).
METRICS = {"retractions": ("sglang:num_retracted_requests_total", "sglang:num_retracted_reqs"),
           "cached_tokens": ("sglang:cached_tokens_total",),
           "chunked_prefills": ("sglang:chunked_prefills_total",),
           "max_running_batch": ("sglang:max_running_reqs_seen", "sglang:num_running_reqs")}
DEFAULT_REQUIRED = ("retractions", "max_running_batch", "chunked_prefills")


@dataclass(frozen=True)
class TrafficRequest:
    prompt: list[int]
    params: SamplingParams
    stream: bool
    arrival: float  # seconds after the start of the run

    def describe(self) -> str:
        p = self.params
        kind = "greedy" if p.temperature == 0 else (f"T={p.temperature} top_k={p.top_k} top_p={p.top_p} "
                                                    f"min_p={p.min_p} own seed")
        return f"{kind}, prompt {len(self.prompt)}, {p.max_new_tokens} new, {'stream' if self.stream else 'whole'}"


def make_traffic(n: int, *, seed: int = 0, vocab: int = 512, max_prompt: int = 160, max_new_tokens: int = 12,
                 spread_s: float = 0.5, page_size: int = 16, group: int = 2, min_p: bool = True,
                 filtered: bool = False) -> list[TrafficRequest]:
    """n requests; half the prompts' lengths on tile/page boundaries, half random up to `max_prompt`;
    as an RL rollout samples each prompt `group` times, consecutive requests share a prompt (their
    own sampling parameters and seeds), so the prefix cache is hit while the group is in flight. `min_p=False`
    leaves min-p out; `filtered=True` gives every sampled request a top-k (40 where it drew none and
    no top-p), so no request samples unfiltered; every other parameter is drawn as without them."""
    if not isinstance(n, int) or n < 2:
        raise InputError(f"n_requests: expected an integer >= 2, got {n!r}")
    if max_prompt < 1 or max_new_tokens < 1 or spread_s < 0 or not isinstance(group, int) or group < 1:
        raise InputError("max_prompt, max_new_tokens and group must be >= 1 and spread_s >= 0")
    rng = random.Random(seed)
    bounds = boundary_lengths(page_size, max_prompt)
    out = []
    for i in range(n):
        g = i // group  # the prompt's group: even groups on a boundary, odd ones random (until 2026-12-04 the
        # random draw went to the group's second request, which reuses the first one's prompt: never used)
        length = bounds[(g // 2) % len(bounds)] if g % 2 == 0 else rng.randint(1, max_prompt) if i % group == 0 else 0
        greedy = rng.random() < 0.3
        temperature = 0.0 if greedy else rng.choice([0.5, 0.8, 1.0, 1.3])
        top_k, top_p = rng.choice([-1, -1, 5, 40]), rng.choice([1.0, 0.9, 0.7])
        drawn_min_p = rng.choice([0.0, 0.0, 0.05])
        if filtered and temperature > 0 and top_k == -1 and top_p == 1.0:
            top_k = 40
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=drawn_min_p if min_p else 0.0, max_new_tokens=rng.randint(1, max_new_tokens),
                                sampling_seed=rng.randrange(1 << 30))
        prompt = out[-1].prompt if i % group else [rng.randrange(3, vocab) for _ in range(length)]
        out.append(TrafficRequest(prompt, params, rng.random() < 0.5, rng.uniform(0, spread_s)))
    return out


def reordered(reqs: list[TrafficRequest], seed: int) -> list[TrafficRequest]:
    """The same requests, arrival times permuted among them (another arrival order)."""
    times = [r.arrival for r in reqs]
    random.Random(seed).shuffle(times)
    return [TrafficRequest(r.prompt, r.params, r.stream, t) for r, t in zip(reqs, times)]


def _metric(m: dict[str, float], witness: str) -> float | None:
    for name in METRICS[witness]:
        if name in m:
            return m[name]
    return None


def drive(engine, reqs: list[TrafficRequest], *, top_logprobs: int = 8, stall_timeout: float = 60.0,
          compile_grace: float = 300.0, witness: dict[str, Any] | None = None) -> tuple[list[Output], int]:
    """Send every request at its arrival time from its own client thread; returns the outputs and
    the largest running batch polled from the engine. A run where no request finishes for
    `stall_timeout` seconds raises AssertionError naming the stall and the engine's queue and pool.
    While the engine's processes run a kernel compiler (a JIT building a kernel the traffic needs
    first, e.g. a sampling kernel of a determinism-off server: slow on a loaded host) the wait goes
    on, up to `compile_grace` seconds more; the compile time goes to `witness["compile_seconds"]`."""
    from pytest_miles.placement.processes import compilers_running

    outs: list[Output | None] = [None] * len(reqs)
    errors: list[str] = []
    progress = threading.Condition()
    t0 = time.monotonic()

    def client(i: int, r: TrafficRequest) -> None:
        time.sleep(max(0.0, t0 + r.arrival - time.monotonic()))
        try:
            outs[i] = engine.generate_one(r.prompt, r.params, top_logprobs=top_logprobs, stream=r.stream)
        except Exception as exc:  # the report says which request and why
            errors.append(f"request {i}: {type(exc).__name__}: {exc}")
        with progress:
            progress.notify_all()

    threads = [threading.Thread(target=client, args=(i, r), daemon=True) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    peak, done, last = 0, 0, time.monotonic()
    metrics = getattr(engine, "metrics", lambda: {})
    pid = getattr(getattr(engine, "proc", None), "pid", None)
    looked, compiled_at, compiled, names = last, 0.0, 0.0, set()
    while done < len(reqs):
        with progress:
            progress.wait(timeout=0.1)
        running = _metric(metrics() or {}, "max_running_batch") if len(reqs) - done > 1 else None
        peak = max(peak, int(running or 0))
        now_done, now = sum(1 for t in threads if not t.is_alive()), time.monotonic()
        if pid and now - looked >= 1.0:  # a compiler under the engine: it is building a kernel, not stalled
            seen = compilers_running(pid)
            if seen:
                compiled += min(now - looked, 2.0)
                compiled_at, names = now, names | set(seen)
            looked = now
        if now_done > done:
            done, last = now_done, now
        elif now - max(last, compiled_at) > stall_timeout or now - last > stall_timeout + compile_grace:
            compiling = (f"; the engine ran kernel compilers ({', '.join(sorted(names))}) for about {compiled:.0f} s "
                         f"of this wait (a JIT building a kernel; a warm kernel cache avoids it: "
                         f"--miles-kernel-cache-dir)" if names else "")
            raise AssertionError(stall_message(engine, len(reqs) - done, len(reqs), now - last) + compiling)
    if witness is not None and names:
        witness["compile_seconds"] = round(witness.get("compile_seconds", 0) + compiled)
        witness["compilers"] = sorted(set(witness.get("compilers", [])) | names)
    if errors:
        raise AssertionError(f"{len(errors)} of {len(reqs)} requests failed under load: " + "; ".join(errors[:5]))
    return [o for o in outs if o is not None], peak


def stall_message(engine, left: int, total: int, waited: float) -> str:
    m = getattr(engine, "metrics", lambda: {})() or {}
    state = {k.split(":")[-1]: v for k, v in m.items()
             if k.split(":")[-1] in ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage",
                                     "max_total_num_tokens")}
    log = getattr(engine, "log_path", None)
    said = f"; its log ends (our own polling left out):\n{log_tail(log, 20)}" if log else ""
    return (f"stall under load: {left} of {total} requests unfinished and none finished for {waited:.0f} s; "
            f"the engine says: {state or 'nothing (no /metrics)'}{said}")


# Access-log lines of the requests this check itself sends while it waits (the /metrics poll ten times a
# second): on 2026-12-04 (H200) they were the whole tail of a stalled server's log, hiding its scheduler.
POLLING = ("GET /metrics", "GET /health", "GET /get_server_info", "GET /server_info")


def log_tail(path: str | None, lines: int = 20, window: int = 4 << 20) -> str:
    """The last `lines` lines of a server log, the check's own polling left out (the last `window`
    bytes read; the log is never written)."""
    import os

    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - window))
            text = f.read().decode(errors="replace")
    except (OSError, TypeError):
        return ""
    kept = [line for line in text.splitlines() if not any(p in line for p in POLLING)]
    return "\n".join(kept[-lines:])


def _log_size(engine) -> int:
    import os

    path = getattr(engine, "log_path", None)
    return os.path.getsize(path) if path and os.path.exists(path) else 0


def _log_retractions(engine, start: int) -> int:
    """Lines SGLang's scheduler logs when the KV pool is full ("... Retract requests ...") since `start`."""
    path = getattr(engine, "log_path", None)
    if not path:
        return 0
    with open(path, "rb") as f:
        f.seek(start)
        return sum(1 for line in f.read().decode(errors="replace").splitlines() if "retract" in line.lower())


def _witness_delta(before: dict, after: dict, outs: list[Output], peak: int, settings: dict,
                   reqs: list[TrafficRequest]) -> dict[str, Any]:
    w: dict[str, Any] = {}
    for key in ("retractions", "cached_tokens", "chunked_prefills"):
        a, b = _metric(after, key), _metric(before, key)
        w[key] = None if a is None else int(a - (b or 0))
    chunk = settings.get("chunked_prefill_size")
    if w["chunked_prefills"] is None and isinstance(chunk, int) and chunk > 0:  # SGLang has no counter of them
        w["chunked_prefills"] = sum(1 for r in reqs if len(r.prompt) > chunk)
        w["chunked_prefills_from"] = "prompts longer than chunked_prefill_size (settings)"
    if not w["cached_tokens"]:
        w["cached_tokens"] = sum(o.cached_tokens or 0 for o in outs)
    w["max_running_batch"] = max(peak, int(_metric(after, "max_running_batch") or 0))
    w["chunked_prefill_size"] = settings.get("chunked_prefill_size")
    return w


def run_traffic(engine, n_requests: int = 64, *, seed: int = 0, top_logprobs: int = 8, stall_timeout: float = 60.0,
                compile_grace: float = 300.0, required: tuple[str, ...] = DEFAULT_REQUIRED, **shape: Any
                ) -> TrafficReport:
    """Both traffic runs and every request alone; the report, unjudged."""
    if not hasattr(engine, "generate_one"):
        raise InputError(f"engine: {type(engine).__name__} cannot send single concurrent requests (needs "
                         "generate_one, as the served engines have: ReferenceServerEngine, SGLangEngine)")
    bad = [w for w in required if w not in METRICS]
    if bad:
        raise InputError(f"required: {bad} not witnesses; accepted: {', '.join(METRICS)}")
    for name, value, zero_ok in (("stall_timeout", stall_timeout, False), ("compile_grace", compile_grace, True)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (value == 0 and not zero_ok):
            raise InputError(f"{name}: {value!r}; accepted: a finite number of seconds {'>=' if zero_ok else '>'} 0")
    vocab = getattr(getattr(engine, "config", None), "vocab_size", 512)
    settings = engine_settings(engine)
    limit, mixed = limitation(engine, settings, "min_p_with_seed"), limitation(engine, settings, "mixed_sampling")
    min_p = bool(shape.pop("min_p", True)) and limit is None
    filtered = bool(shape.pop("filtered", False)) or mixed is not None
    reqs = make_traffic(n_requests, seed=seed, vocab=vocab, min_p=min_p, filtered=filtered, **shape)
    t0 = time.perf_counter()
    report = TrafficReport(getattr(engine, "name", type(engine).__name__), n_requests, required=tuple(required),
                           settings=settings, shape={"requests": n_requests, "top_logprobs": top_logprobs, **shape,
                                                     "min_p": min_p, "filtered": filtered})
    if limit is not None:
        report.notes.append(f"min_p left out of the traffic (every other parameter as drawn): {limit}")
    if mixed is not None:
        report.notes.append(f"every sampled request filters (top-k 40 where it drew no filter): {mixed}")
    engine.flush_cache()
    before, log_at = getattr(engine, "metrics", lambda: {})() or {}, _log_size(engine)
    compiling: dict[str, Any] = {}
    first, peak = drive(engine, reqs, top_logprobs=top_logprobs, stall_timeout=stall_timeout,
                        compile_grace=compile_grace, witness=compiling)
    after = getattr(engine, "metrics", lambda: {})() or {}
    report.witnesses = _witness_delta(before, after, first, peak, settings, reqs)
    if not report.witnesses["retractions"]:
        logged = _log_retractions(engine, log_at)
        if logged:
            report.witnesses.update(retractions=logged, retractions_from="server log lines")
    engine.flush_cache()
    second, _ = drive(engine, reordered(reqs, seed + 1), top_logprobs=top_logprobs, stall_timeout=stall_timeout,
                      compile_grace=compile_grace, witness=compiling)
    report.witnesses.update(compiling)  # kernels the engine built under the traffic, if any
    alone = []
    for r in reqs:
        engine.flush_cache()
        alone.append(engine.generate_one(r.prompt, r.params, top_logprobs=top_logprobs, stream=False))
    report.seconds = time.perf_counter() - t0
    chunk = settings.get("chunked_prefill_size")
    if isinstance(chunk, int) and chunk > 0:
        report.chunked = [i for i, r in enumerate(reqs) if len(r.prompt) > chunk]
    return compare_traffic(report, [r.describe() for r in reqs], first, second, alone)


def limitation(engine, settings: dict[str, Any], check: str) -> str | None:
    """The capability data's known limitation of this engine for `check` (min_p_with_seed: a
    deterministic SGLang server dies on a min-p request; mixed_sampling: a seeded request samples
    another token when a batchmate filters), described; None where the engine has none."""
    from pytest_miles.capabilities.verdict import capability_for

    cap = capability_for(engine, check, {}, settings)
    return cap.describe() if cap.known else None


@recorded("seeded sampling beside a filtering batchmate")
def assert_sampling_batch_invariant(engine, *, trials: int = 8, prompt_len: int = 16, max_new_tokens: int = 4
                                    ) -> FeatureReport:
    """A seeded, unfiltered request (top_k -1, top_p 1) must sample the same tokens alone and in one
    batch beside a greedy request (greedy is top-k 1: a filter). SGLang's deterministic sampler hashes
    its noise by token id for an all-unfiltered batch and by sorted rank once any row filters, so the
    batchmate changes the token: the capability data's known limitation (XFAIL naming it)."""
    from pytest_miles.capabilities.verdict import capability_for, judge

    if not isinstance(trials, int) or trials < 1:
        raise InputError(f"trials: expected an integer >= 1, got {trials!r}")
    settings = engine_settings(engine)
    vocab = getattr(getattr(engine, "config", None), "vocab_size", 512)
    rng = random.Random(trials)
    differ = []
    for t in range(trials):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        free = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, sampling_seed=1000 + t)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        engine.flush_cache()
        alone = engine.generate([prompt], free)[0]
        engine.flush_cache()
        beside = engine.generate([prompt, prompt[::-1]], [free, greedy])[0]
        diff = first_difference(alone, beside)
        if diff is not None:
            differ.append(f"trial {t}: {diff}")
    name = getattr(engine, "name", type(engine).__name__)
    detail = (f"{trials} seeded unfiltered requests, alone and beside a greedy one: {len(differ)} differ"
              + "".join(f"\n  - {d}" for d in differ[:5]))
    report = FeatureReport(name, "mixed_sampling", not differ, detail, settings)
    return judge(report, capability_for(engine, "mixed_sampling", {}, settings))


@recorded("min_p with a seed served")
def assert_min_p_served(engine, *, seed: int = 0, max_new_tokens: int = 8) -> FeatureReport:
    """One sampled request with min_p (and its own seed) must be answered; a deterministic SGLang
    server that dies on it is the capability data's known limitation (XFAIL naming its reference).
    The engine may be dead afterwards: the engine factory starts a new one for the next test."""
    from pytest_miles.capabilities.verdict import capability_for, judge

    settings = engine_settings(engine)
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.05, max_new_tokens=max_new_tokens,
                            sampling_seed=seed + 1)
    name = getattr(engine, "name", type(engine).__name__)
    try:
        out = engine.generate_one([5, 17, 99, 3, 250, 41, 7, 300], params, stream=False)
        report = FeatureReport(name, "min_p_with_seed", True, f"answered {len(out.output_ids)} token(s)", settings)
    except Exception as exc:  # the server's own failure is the finding
        report = FeatureReport(name, "min_p_with_seed", False, f"{type(exc).__name__}: {str(exc)[:1500]}", settings)
    return judge(report, capability_for(engine, "min_p_with_seed", {}, settings))


@recorded("determinism under load")
def assert_deterministic_under_load(engine, n_requests: int = 64, **kwargs: Any) -> TrafficReport:
    """Raise AssertionError with the report unless every request matches itself alone and across
    arrival orders bitwise; NotApplicable when the engine shows none of the `required` stress."""
    from pytest_miles.capabilities.verdict import capability_for

    report = run_traffic(engine, n_requests, **kwargs)
    return judge_traffic(report, *(capability_for(engine, mode, report.shape, report.settings)
                                   for mode in EXPLANATIONS))


@recorded("negative control (must fail): determinism under load")
def traffic_negative_control(engine, n_requests: int = 64, **kwargs: Any) -> TrafficReport:
    """The same traffic on an engine with determinism off: it must be caught, naming the variance."""
    return judge_control(run_traffic(engine, n_requests, **kwargs), getattr(engine, "deterministic", None))
