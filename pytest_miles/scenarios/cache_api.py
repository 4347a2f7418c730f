"""Every cache path and every API surface, driven on engines already started (checks/cache_paths.py
and checks/api_surfaces.py judge). The served engine needs `generate_one(prompt, params,
top_logprobs=)` and `flush_cache()`; `metrics()` (Prometheus /metrics: SGLang with
--enable-metrics) adds the cache-hit counter; the OpenAI surfaces need a server (`_post`) with a
tokenizer (models/tokenizer_vocab.py writes one: `with_tokenizer`)."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any

from pytest_miles.checks.api_surfaces import REFERENCE, SurfaceReport, SurfaceRequest, judge_api_surfaces
from pytest_miles.checks.cache_paths import CachePath, CacheReport, judge_cache_cells
from pytest_miles.checks.witness import engine_settings
from pytest_miles.engines.base import Output, SamplingParams
from pytest_miles.errors import InputError
from pytest_miles.models.tokenizer_vocab import text_ids
from pytest_miles.recording import recorded

CACHED_METRIC = "sglang:cached_tokens_total"
# Greedy next to sampled with its own seed; ignore_eos so every surface and turn runs its full length
# (a stop token would end turn 1 early, and the surfaces trim stops differently).
DEFAULT_PARAMS = (SamplingParams(temperature=0.0, max_new_tokens=8, sampling_seed=None, ignore_eos=True),
                  SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=8, sampling_seed=1234,
                                 ignore_eos=True))


def _engine_name(engine: Any) -> str:
    return getattr(engine, "name", type(engine).__name__)


def _served(engine: Any, what: str) -> None:
    missing = [m for m in ("generate_one", "flush_cache") if not hasattr(engine, m)]
    if missing:
        raise InputError(f"{what}: {type(engine).__name__} lacks {', '.join(missing)} (accepted: the served engines "
                         "ReferenceServerEngine, SGLangEngine, and SGLangOfflineEngine)")


def _params(params: Any) -> tuple[SamplingParams, ...]:
    if params is None:
        return DEFAULT_PARAMS
    items = (params,) if isinstance(params, SamplingParams) else tuple(params)
    if not items or not all(isinstance(p, SamplingParams) for p in items):
        raise InputError(f"params: expected a SamplingParams or a list of them, got {params!r:.100}")
    return items


def _describe(p: SamplingParams) -> str:
    if p.temperature == 0:
        return f"greedy, {p.max_new_tokens} new"
    return f"T={p.temperature} top_k={p.top_k} top_p={p.top_p} min_p={p.min_p} own seed, {p.max_new_tokens} new"


def _cached_total(engine: Any) -> float | None:
    m = getattr(engine, "metrics", lambda: {})() or {}
    return m.get(CACHED_METRIC)


def _settings(engine: Any) -> dict[str, Any]:
    """The witness settings, plus the overlap scheduler (its radix-cache race is an open report) and
    a planted fault (the reference server's negative controls name theirs)."""
    settings = engine_settings(engine)
    info = engine.server_info() if hasattr(engine, "server_info") and "error" not in settings else {}
    for key in ("disable_overlap_schedule", "fault"):
        if info.get(key) is not None:
            settings[key] = info[key]
    return settings


def _warm(engine: Any, prompt: list[int], p: SamplingParams, k: int) -> tuple[Output, int | None]:
    before = _cached_total(engine)
    out = engine.generate_one(prompt, p, top_logprobs=k)
    after = _cached_total(engine)
    return out, None if before is None or after is None else int(after - before)


def _cold(engine: Any, prompt: list[int], p: SamplingParams, k: int) -> Output:
    engine.flush_cache()
    return engine.generate_one(prompt, p, top_logprobs=k)


def _open_references(engine: Any, settings: dict[str, Any]) -> list[str]:
    """What the capability data says is open upstream about the radix cache and the overlap
    scheduler, for this SGLang backend and version (empty for other engines)."""
    from pytest_miles.capabilities import SGLANG_KINDS, installed_sglang_version, load_capabilities

    if _engine_name(engine).split("@")[0] not in SGLANG_KINDS:
        return []
    version = settings.get("version") or installed_sglang_version()
    backend = settings.get("attention_backend")
    out = []
    for a in load_capabilities().applies:
        if a.feature in ("radix_cache", "overlap_schedule") and a.references and version and a.matches(version,
                                                                                                     backend):
            out.append(f"[{a.id}] {a.why} (see {'; '.join(a.references)})")
    return out


def run_cache_paths(engine: Any, *, trials: int = 2, prompt_len: int = 40, new_tokens: int = 6, params: Any = None,
                    top_logprobs: int = 8, seed: int = 0) -> CacheReport:
    """Per trial and sampling setting, both paths: `prefix` (warm the cache with a prefix, then the
    longer prompt) and `decode_kv` (turn 1, then turn 2 = turn 1's prompt + output + `new_tokens`);
    each warm request against the same request twice on a flushed engine. Unjudged."""
    _served(engine, "engine")
    items = _params(params)
    if not isinstance(trials, int) or trials < 1 or not isinstance(prompt_len, int) or prompt_len < 2:
        raise InputError(f"trials >= 1 and prompt_len >= 2 expected, got trials={trials!r}, prompt_len={prompt_len!r}")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise InputError(f"new_tokens: expected an integer >= 1, got {new_tokens!r}")
    if any(p.max_new_tokens < 2 for p in items):
        raise InputError("params: max_new_tokens must be >= 2, so that turn 1 writes KV while decoding")
    rng, vocab = random.Random(seed), getattr(getattr(engine, "config", None), "vocab_size", 512)
    settings = _settings(engine)
    report = CacheReport(_engine_name(engine), settings=settings, shape={
        "trials": trials, "prompt_len": prompt_len, "new_tokens": new_tokens, "top_logprobs": top_logprobs})
    t0 = time.perf_counter()
    for trial in range(1, trials + 1):
        for p in items:
            base = [rng.randrange(3, vocab) for _ in range(prompt_len)]
            q = base + [rng.randrange(3, vocab) for _ in range(rng.randint(1, max(1, prompt_len // 2)))]
            cold = _cold(engine, q, p, top_logprobs)
            engine.flush_cache()
            engine.generate_one(base, p, top_logprobs=top_logprobs)  # leaves base (and its decode KV) cached
            warm, delta = _warm(engine, q, p, top_logprobs)
            report.paths.append(CachePath("prefix", trial, _describe(p), cold, warm, 1, delta,
                                          _cold(engine, q, p, top_logprobs)))
            engine.flush_cache()
            turn1 = engine.generate_one(base, p, top_logprobs=top_logprobs)
            turn2 = base + turn1.output_ids + [rng.randrange(3, vocab) for _ in range(new_tokens)]
            warm, delta = _warm(engine, turn2, p, top_logprobs)
            cold = _cold(engine, turn2, p, top_logprobs)
            report.paths.append(CachePath("decode_kv", trial, _describe(p), cold, warm, len(base) + 1, delta,
                                          _cold(engine, turn2, p, top_logprobs)))
    report.seconds = time.perf_counter() - t0
    report.notes += _open_references(engine, settings)
    return report


@recorded("every cache path")
def assert_cache_paths_deterministic(engine: Any, **kwargs: Any) -> CacheReport:
    """Raise AssertionError with the report unless every warm request (a cached prefix; a second
    turn reusing decode-written KV) gives the bits of the same request on a flushed engine; not
    applicable, naming why, without a cache or without a witnessed hit; XFAIL where the capability
    data records the limitation."""
    from pytest_miles.capabilities.verdict import capability_for

    report = run_cache_paths(engine, **kwargs)
    return judge_cache_cells(report, capability_for(engine, "radix_cache", report.shape, report.settings),
                             capability_for(engine, "decode_kv", report.shape, report.settings))


def _surfaces(engine: Any, offline: Any, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """surface -> how to call it (prompt, params, k) -> (Output, prompt ids or None); and the reasons
    for those that cannot run here."""
    from pytest_miles.engines import openai_surfaces as oa

    calls: dict[str, Any] = {REFERENCE: lambda pr, p, k: (engine.generate_one(pr, p, top_logprobs=k), None)}
    skipped: dict[str, str] = {}
    info = engine.server_info() if hasattr(engine, "server_info") else {}
    if not hasattr(engine, "_post"):
        why = f"{_engine_name(engine)} is not an HTTP server"
        skipped.update({"/v1/completions": why, "/v1/chat/completions": why})
    elif info.get("skip_tokenizer_init"):
        why = ("the server runs without a tokenizer (skip_tokenizer_init): SGLang's OpenAI surfaces answer text "
               "and text-keyed logprobs, and the chat surface applies the tokenizer's chat template (serve a model "
               "folder with a tokenizer: models.tokenizer_vocab.with_tokenizer)")
        skipped.update({"/v1/completions": why, "/v1/chat/completions": why})
    elif _foreign_tokenizer(info):
        why = ("the served tokenizer is not the embedded one (models.tokenizer_vocab): the OpenAI surfaces key "
               "their top-k logprobs by token text, which only the embedded tokenizer maps back to ids exactly")
        skipped.update({"/v1/completions": why, "/v1/chat/completions": why})
    else:
        calls["/v1/completions"] = lambda pr, p, k: (oa.complete_one(engine, pr, p, k), None)
        calls["/v1/chat/completions"] = lambda pr, p, k: oa.chat_one(engine, pr, p, k)
    if offline is None:
        skipped["sglang.Engine"] = "no offline engine given (offline=SGLangOfflineEngine(...))"
    else:
        name = _engine_name(offline)
        label = "sglang.Engine" if name.startswith("sglang") else f"{name} (in process)"
        calls[label] = lambda pr, p, k: (offline.generate_one(pr, p, top_logprobs=k), None)
    return calls, skipped


def _foreign_tokenizer(info: dict[str, Any]) -> bool:
    """The server names its tokenizer folder (SGLang: tokenizer_path, model_path) and it is not ours."""
    from pytest_miles.models.tokenizer_vocab import is_embedded_tokenizer

    path = info.get("tokenizer_path") or info.get("model_path")
    return bool(path) and is_embedded_tokenizer(path) is False


def run_api_surfaces(engine: Any, offline: Any = None, *, requests: int = 2, prompt_len: int = 24,
                     params: Any = None, top_logprobs: int = 8, seed: int = 0) -> SurfaceReport:
    """Each request (a prompt of printable-character ids, so it round-trips through the chat
    template) per sampling setting on every surface, each on a flushed engine; sampled requests
    once more on /generate with another seed (the seed witness). Unjudged."""
    _served(engine, "engine")
    if offline is not None:
        _served(offline, "offline")
    items = _params(params)
    if not isinstance(requests, int) or requests < 1 or not isinstance(prompt_len, int) or prompt_len < 1:
        raise InputError(f"requests >= 1 and prompt_len >= 1 expected, got {requests!r}, {prompt_len!r}")
    settings = _settings(engine)
    calls, skipped = _surfaces(engine, offline, settings)
    report = SurfaceReport(_engine_name(engine), not_applicable=skipped, settings=settings, shape={
        "requests": requests * len(items), "prompt_len": prompt_len, "top_logprobs": top_logprobs})
    rng, ids, t0 = random.Random(seed), list(text_ids()), time.perf_counter()
    for _ in range(requests):
        for p in items:
            prompt = [rng.choice(ids) for _ in range(prompt_len)]
            req = SurfaceRequest(len(report.requests), _describe(p), prompt)
            for surface, call in calls.items():
                for eng in (engine, offline):
                    if eng is not None:
                        eng.flush_cache()
                out, used = call(prompt, p, top_logprobs)
                req.outputs[surface] = out
                if used is not None:
                    req.prompt_ids[surface] = used
            if p.temperature > 0 and p.sampling_seed is not None:
                engine.flush_cache()
                other = engine.generate_one(prompt, replace(p, sampling_seed=p.sampling_seed + 1), top_logprobs=0)
                req.seed_changes = other.output_ids != req.outputs[REFERENCE].output_ids
            report.requests.append(req)
    report.seconds = time.perf_counter() - t0
    return report


@recorded("every API surface")
def assert_api_surfaces_agree(engine: Any, offline: Any = None, **kwargs: Any) -> SurfaceReport:
    """Raise AssertionError with the report unless the same request gives the same bits on every
    surface that can serve it (/generate, /v1/completions, /v1/chat/completions, sglang.Engine);
    not applicable with fewer than two surfaces or when no seed mattered."""
    from pytest_miles.capabilities.verdict import capability_for

    report = run_api_surfaces(engine, offline, **kwargs)
    return judge_api_surfaces(report, capability_for(engine, "api_surfaces", report.shape, report.settings))
