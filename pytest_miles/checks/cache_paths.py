"""Every cache path, the judging half (scenarios/cache_api.py drives the engine): a request served
from a warm cache against the same request on a flushed engine, bit for bit (token ids, chosen
logprobs, top-k maps), for each path a rollout takes:

- `prefix`: a prompt whose prefix an earlier request left in the radix cache (cold vs warm prefill);
- `decode_kv`: a second turn whose prompt is turn 1's prompt + turn 1's output + new tokens, so the
  KV written while decoding turn 1 is reused (the hit must reach past turn 1's prompt to prove it).

A pass must prove the hit happened: each path's witness is read from the engine (SGLang's
meta_info.cached_tokens; else the sglang:cached_tokens_total delta of /metrics). A path with no
hit, or an engine that runs without a cache, is not applicable, naming why; a difference on a hit
path goes through the capability data (the radix_cache cells, and the decode_kv cells where only second
turns differ: promised, or XFAIL naming the upstream
report). Two flushed runs that differ are a failure whatever the data says (no cache took part)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_miles.checks.traffic import first_difference
from pytest_miles.checks.witness import context_lines
from pytest_miles.engines.base import Output
from pytest_miles.errors import NotApplicable

PATHS = {"prefix": "a prompt whose prefix is in the radix cache, vs the same prompt on a flushed engine",
         "decode_kv": "turn 2 (turn 1's prompt + its output + new tokens) reusing the KV written while decoding "
                      "turn 1, vs the same turn 2 on a flushed engine"}


@dataclass
class CachePath:
    path: str  # one of PATHS
    trial: int
    sampling: str
    cold: Output  # the request on a flushed engine
    warm: Output  # the same request after the cache was warmed
    needed: int  # cached tokens that prove the path ran (decode_kv: more than turn 1's prompt)
    metric_hit: int | None = None  # sglang:cached_tokens_total over the warm request, if the engine has /metrics
    cold_again: Output | None = None  # a second flushed run (run-to-run, no cache)

    @property
    def hit(self) -> int | None:
        """The cached tokens the engine reports for the warm request (meta_info first, then /metrics)."""
        return self.warm.cached_tokens if self.warm.cached_tokens is not None else self.metric_hit

    @property
    def witnessed(self) -> bool:
        return self.hit is not None and self.hit >= self.needed

    def difference(self) -> str | None:
        return first_difference(self.cold, self.warm)

    def run_to_run(self) -> str | None:
        return None if self.cold_again is None else first_difference(self.cold, self.cold_again)

    def describe(self) -> str:
        src = "meta_info.cached_tokens" if self.warm.cached_tokens is not None else "/metrics cached_tokens_total"
        return (f"{self.path} #{self.trial} ({self.sampling}): cached {self.hit} tokens ({src}; a hit needs "
                f">= {self.needed}), /metrics delta {self.metric_hit}")


@dataclass
class CacheReport:
    engine: str
    paths: list[CachePath] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "radix_cache"  # the capability cells it consults

    def differences(self) -> list[tuple[CachePath, str]]:
        """Warm vs cold on the paths whose hit is witnessed."""
        return [(p, d) for p in self.paths if p.witnessed for d in [p.difference()] if d is not None]

    def run_to_run(self) -> list[tuple[CachePath, str]]:
        return [(p, d) for p in self.paths for d in [p.run_to_run()] if d is not None]

    @property
    def passed(self) -> bool:
        return not self.differences() and not self.run_to_run()

    def unwitnessed(self) -> list[CachePath]:
        return [p for p in self.paths if not p.witnessed]

    def render(self, limit: int = 10) -> str:
        diffs, r2r = self.differences(), self.run_to_run()
        lines = [f"cache paths on {self.engine}: {'PASS' if self.passed else 'FAIL'}; {len(self.paths)} requests "
                 f"({', '.join(sorted({p.path for p in self.paths}))}), {len(diffs)} warm-vs-cold differences, "
                 f"{self.seconds:.1f} s"]
        lines += [f"  - {p.path} #{p.trial} ({p.sampling}) warm vs flushed [cache state]: {d} (cached_tokens "
                  f"{p.hit})" for p, d in diffs[:limit]]
        lines += [f"  - {p.path} #{p.trial} ({p.sampling}) flushed vs flushed [run to run, no cache]: {d}"
                  for p, d in r2r[:limit]]
        lines += ["  witness: " + p.describe() for p in self.paths[:limit]]
        lines += context_lines(self.shape, self.settings, self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "passed": self.passed, "settings": self.settings, "shape": self.shape,
                "notes": self.notes, "seconds": self.seconds,
                "paths": [{"path": p.path, "trial": p.trial, "sampling": p.sampling, "cached_tokens": p.hit,
                           "needed": p.needed, "metric_hit": p.metric_hit, "witnessed": p.witnessed,
                           "difference": p.difference(), "run_to_run": p.run_to_run()} for p in self.paths]}


def no_cache_reason(settings: dict[str, Any], capability: Any) -> str | None:
    """Why this engine has no cache to test, read from its settings and the capability data; None
    when it keeps one."""
    if capability is not None and capability.status == "not_applicable":
        return f"not applicable: {capability.describe()}"
    if settings.get("disable_radix_cache") is True:
        why = settings.get("note") or "the engine runs without a radix cache"
        return (f"not applicable: the engine reports disable_radix_cache=true (/get_server_info or server_args): "
                f"{why}; there is no warm cache to compare with")
    return None


def judge_cache_paths(report: CacheReport, capability: Any) -> CacheReport:
    """Flushed runs that differ: AssertionError. No cache, or a path whose hit is not witnessed:
    NotApplicable naming why. Then the warm-vs-cold differences through the capability data."""
    from pytest_miles.capabilities.verdict import judge

    r2r = report.run_to_run()
    if r2r:
        raise AssertionError("the same request on a flushed engine gave other bits twice (no cache took part, so "
                             f"this is run-to-run nondeterminism, not a cache path)\n{report.render()}")
    reason = no_cache_reason(report.settings, capability)
    if reason is not None:
        hits = [p for p in report.paths if p.witnessed]
        if hits:  # the data or the settings say no cache, yet the engine reports hits: say so
            report.notes.append(f"{len(hits)} requests report cache hits although the check is {reason}; the "
                                "capability data or the settings may be stale")
        raise NotApplicable(f"cache paths {reason}\n{report.render()}")
    if report.differences():  # a witnessed hit that changed the bits: not hidden by another path's missing hit
        return judge(report, capability)
    missing = report.unwitnessed()
    if missing:
        paths = sorted({p.path for p in missing})
        raise NotApplicable(f"cache paths not applicable: no cache hit witnessed on {', '.join(paths)} ("
                            + "; ".join(p.describe() for p in missing[:4]) + "): a pass would compare two cold "
                            f"prefills\n{report.render()}")
    return judge(report, capability)


def judge_cache_cells(report: CacheReport, radix: Any, decode: Any) -> CacheReport:
    """Judge with the radix_cache cell, or with the decode_kv cell (`decode`) where that one lists a
    known limitation and no cached prefix differed: XFAIL naming it when only second turns over
    decode-written KV differ, XPASS when nothing did (witnesses and "no cache" checked first). A
    difference on a prefill-written prefix is always judged by the radix_cache cell."""
    diffs = report.differences()
    if decode.known and all(p.path == "decode_kv" for p, _ in diffs):
        if not diffs:
            judge_cache_paths(report, radix)
        report.mode = "decode_kv"
        return judge_cache_paths(report, decode)
    return judge_cache_paths(report, radix)
