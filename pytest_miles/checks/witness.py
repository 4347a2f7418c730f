"""Witnesses against vacuous passes: the settings the engine actually runs with (read from the
engine, not assumed from what we asked for), and proof that the code path a mode tests ran
(a radix-cache hit for `radix_cache`)."""

from __future__ import annotations

from typing import Any

# What every report carries: the settings that decide which kernels and paths ran.
SETTING_KEYS = ("attention_backend", "enable_deterministic_inference", "disable_radix_cache", "disable_cuda_graph",
                "cuda_graph_max_bs", "chunked_prefill_size", "sampling_backend", "version")


def engine_settings(engine: Any) -> dict[str, Any]:
    """The effective settings, from `engine.server_info()` (SGLang: /get_server_info or the offline
    engine's server_args; the reference engines answer the same keys). {} if the engine has none."""
    info_fn = getattr(engine, "server_info", None)
    if info_fn is None:
        return {}
    try:
        info = info_fn() or {}
    except Exception as exc:  # a settings read must not hide the check's own result
        return {"error": f"server_info failed: {exc}"}
    out = {k: info[k] for k in SETTING_KEYS if k in info}
    if out.get("attention_backend") is None:
        for k in ("decode_attention_backend", "prefill_attention_backend"):
            if info.get(k):
                out["attention_backend"] = info[k]
                break
    if "note" in info:
        out["note"] = info["note"]
    return out


def radix_cache_witness(settings: dict[str, Any], cached_tokens: list[int | None], engine: str) -> tuple[str, str]:
    """('hit', detail) when the warm requests hit the cache; ('not_applicable', reason) when the
    engine reports its radix cache off or cannot report hits; ('vacuous', reason) when the cache
    is on but nothing hit (then a pass compared two cold prefills)."""
    if settings.get("disable_radix_cache") is True:
        why = settings.get("note") or "the engine runs without a radix cache"
        return "not_applicable", (f"{engine} reports disable_radix_cache=true (read from the engine's settings: "
                                  f"/get_server_info or server_args): {why}; a warm-cache comparison would compare two "
                                  "cold prefills")
    known = [c for c in cached_tokens if c is not None]
    if not known:
        return "not_applicable", (f"{engine} reports no meta_info.cached_tokens, so no cache hit can be shown; "
                                  "the comparison may be two cold prefills")
    if max(known) == 0:
        return "vacuous", (f"{engine} reports its radix cache on, but no warm request hit it (cached_tokens "
                           f"{known}): the comparison was two cold prefills and shows nothing")
    return "hit", f"cached_tokens on the warm requests: {known}"


def context_lines(shape: dict[str, Any], settings: dict[str, Any], notes: list[str]) -> list[str]:
    """The lines every report ends with: the shape it ran, the settings read from the engine, its notes."""
    lines = []
    if shape:
        lines.append("  shape: " + ", ".join(f"{k} {v}" for k, v in shape.items()))
    if settings:
        lines.append("  engine settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return lines + [f"  note: {n}" for n in notes]
