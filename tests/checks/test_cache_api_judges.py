"""The judging halves of the cache-path and API-surface checks, on hand-made outputs: witnesses
(a hit must reach past turn 1's prompt for decode-written KV), not applicable with the reason,
run-to-run differences always fail, and the capability data's verdicts (not applicable on
flashinfer, XFAIL for a known limitation, the API cell citing its upstream report)."""

from __future__ import annotations

import math

import pytest

from pytest_miles.capabilities import Capability, load_capabilities
from pytest_miles.checks.api_surfaces import SurfaceReport, SurfaceRequest, judge_api_surfaces
from pytest_miles.checks.cache_paths import CachePath, CacheReport, judge_cache_cells, judge_cache_paths
from pytest_miles.engines.base import Output
from pytest_miles.errors import KnownLimitation, NotApplicable, UnexpectedPass

PROMISED = Capability("promised", None, True, "reference-server")


def _out(cached=None, lp=-0.25):
    return Output([5, 9], [lp, -1.5], cached, [{5: lp, 7: -1.0}, {9: -1.5, 3: -1.75}])


def _path(path="prefix", cached=40, needed=1, warm_lp=-0.25, metric=None, cold_again=None):
    return CachePath(path, 1, "greedy", _out(0), _out(cached, warm_lp), needed, metric, cold_again or _out(0))


def _cache_report(*paths, **settings):
    return CacheReport("reference-server", list(paths), settings={"disable_radix_cache": False, **settings})


def test_a_hit_is_witnessed_from_meta_info_or_else_from_metrics_and_decode_kv_must_reach_past_turn_one():
    assert _path(cached=40).witnessed and not _path(cached=0).witnessed
    assert _path(cached=None, metric=12).witnessed and _path(cached=None, metric=12).hit == 12
    assert not _path(cached=None, metric=None).witnessed
    assert not _path("decode_kv", cached=24, needed=25).witnessed  # only turn 1's prompt: no decode KV reused
    assert _path("decode_kv", cached=26, needed=25).witnessed


def test_a_pass_needs_every_path_hit_otherwise_not_applicable_naming_the_path():
    report = judge_cache_paths(_cache_report(_path(), _path("decode_kv", cached=30, needed=25)), PROMISED)
    assert report.passed
    with pytest.raises(NotApplicable, match="no cache hit witnessed on decode_kv"):
        judge_cache_paths(_cache_report(_path(), _path("decode_kv", cached=24, needed=25)), PROMISED)
    with pytest.raises(NotApplicable, match=r"disable_radix_cache=true .*: no cache here"):
        judge_cache_paths(_cache_report(_path(cached=0), disable_radix_cache=True, note="no cache here"), PROMISED)


def test_a_warm_difference_fails_as_cache_state_and_a_flushed_one_fails_whatever_the_data_says():
    bad = _path(warm_lp=math.nextafter(-0.25, 0.0))  # NEGATIVE CONTROL: a hit that moved one ulp
    with pytest.raises(AssertionError, match=r"prefix #1 \(greedy\) warm vs flushed \[cache state\]: token 0"):
        judge_cache_paths(_cache_report(bad), PROMISED)
    flashinfer = load_capabilities().lookup("flashinfer", "radix_cache", "0.5.17", engine="sglang")
    with pytest.raises(NotApplicable, match="flashinfer-radix-cache-disabled"):
        judge_cache_paths(_cache_report(_path(cached=0)), flashinfer)
    r2r = _path(cached=0, cold_again=_out(0, lp=-0.5))
    with pytest.raises(AssertionError, match="run-to-run nondeterminism"):
        judge_cache_paths(_cache_report(r2r), flashinfer)


def test_a_known_limitation_in_the_data_is_an_xfail_naming_its_reference():
    fa4 = load_capabilities().lookup("fa4", "radix_cache", "0.5.17", engine="sglang")
    assert fa4.known
    with pytest.raises(KnownLimitation, match="33417"):
        judge_cache_paths(_cache_report(_path(warm_lp=-0.5)), fa4)


def _api_report(outputs, prompt_ids=None, seed_changes=True, missing=None):
    req = SurfaceRequest(0, "T=0.9 own seed", [5, 6, 7], outputs, prompt_ids or {}, seed_changes)
    return SurfaceReport("sglang", [req], not_applicable=dict(missing or {}))


def test_api_surfaces_pass_fail_and_not_applicable():
    same = {"/generate": _out(), "/v1/completions": _out(), "/v1/chat/completions": _out()}
    assert judge_api_surfaces(_api_report(same), PROMISED).passed
    cell = load_capabilities().lookup("flashinfer", "api_surfaces", "0.5.17", engine="sglang")
    assert cell.status == "promised" and "15481" in cell.describe()
    off = {**same, "/v1/completions": _out(lp=-0.5)}  # NEGATIVE CONTROL: one surface deviates
    with pytest.raises(AssertionError, match=r"(?s)/v1/completions vs /generate: token 0.*15481"):
        judge_api_surfaces(_api_report(off), cell)
    with pytest.raises(NotApplicable, match="no sampled request changed with its seed"):
        judge_api_surfaces(_api_report(same, seed_changes=False), PROMISED)
    with pytest.raises(NotApplicable, match="fewer than two surfaces.*no tokenizer"):
        judge_api_surfaces(_api_report({"/generate": _out()}, missing={"/v1/completions": "no tokenizer"}), PROMISED)


def test_a_chat_template_that_changes_the_prompt_takes_the_chat_surface_out_naming_why():
    outs = {"/generate": _out(), "/v1/chat/completions": _out(lp=-0.5), "/v1/completions": _out()}
    report = judge_api_surfaces(_api_report(outs, {"/v1/chat/completions": [1, 5, 6, 7]}), PROMISED)
    assert report.surfaces == ["/generate", "/v1/completions"]
    assert "chat template changes the prompt" in report.not_applicable["/v1/chat/completions"]


def test_a_difference_on_a_hit_path_fails_even_when_another_path_had_no_hit():
    bad = _path(warm_lp=-0.5)
    with pytest.raises(AssertionError, match=r"prefix #1 \(greedy\) warm vs flushed"):
        judge_cache_paths(_cache_report(bad, _path("decode_kv", cached=24, needed=25)), PROMISED)


def test_second_turns_over_decode_written_kv_follow_their_own_cell_and_prefixes_stay_promised():
    """sglang 0.5.17 on triton (H200, 2026-12-04): every second turn over decode-written KV differed while
    every prefill-written prefix held. The decode_kv cell makes the first an XFAIL naming it; a prefix that
    differs still fails on the radix_cache cell's promise; nothing differing in the reproducing shape is
    XPASS(strict)."""
    caps = load_capabilities()
    radix = caps.lookup("triton", "radix_cache", "0.5.17", engine="sglang")
    decode = caps.lookup("triton", "decode_kv", "0.5.17", {"prompt_len": 40}, engine="sglang")
    assert not radix.known and decode.known and decode.cell.id == "decode-written-kv-is-not-prefill-kv"
    moved = math.nextafter(-0.25, 0.0)  # NEGATIVE CONTROL: one ulp, as measured
    only_turn2 = _cache_report(_path(), _path("decode_kv", cached=48, needed=41, warm_lp=moved))
    with pytest.raises(KnownLimitation) as exc:
        judge_cache_cells(only_turn2, radix, decode)
    assert exc.value.capability.cell.id == "decode-written-kv-is-not-prefill-kv"
    both = _cache_report(_path(warm_lp=moved), _path("decode_kv", cached=48, needed=41, warm_lp=moved))
    with pytest.raises(AssertionError, match=r"prefix #1 \(greedy\) warm vs flushed") as exc:
        judge_cache_cells(both, radix, decode)
    assert not isinstance(exc.value, KnownLimitation)
    clean = _cache_report(_path(), _path("decode_kv", cached=48, needed=41))
    clean.shape = {"prompt_len": 40}
    with pytest.raises(UnexpectedPass, match="XPASS.strict"):
        judge_cache_cells(clean, radix, decode)
    with pytest.raises(NotApplicable, match="no cache hit witnessed on decode_kv"):  # witnesses first
        judge_cache_cells(_cache_report(_path(), _path("decode_kv", cached=24, needed=41)), radix, decode)
    with pytest.raises(AssertionError, match=r"decode_kv #1 \(greedy\) warm vs flushed"):  # no cell: promised
        judge_cache_cells(_cache_report(_path(), _path("decode_kv", cached=48, needed=41, warm_lp=moved)),
                          PROMISED, PROMISED)
