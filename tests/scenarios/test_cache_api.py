"""Every cache path and every API surface on the embedded reference server (a real subprocess with
its scheduler, prefix cache and SGLang's OpenAI surfaces): the deterministic server passes with each
hit witnessed; planted faults (named negative controls: a cache hit that rounds its KV, a
/v1/completions that drops the seed) are caught and named; without a cache or a tokenizer the checks
are not applicable, naming why."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.errors import InputError, NotApplicable  # noqa: E402
from pytest_miles.models.embedded import write_hf_checkpoint  # noqa: E402
from pytest_miles.models.tokenizer_vocab import with_tokenizer  # noqa: E402
from pytest_miles.scenarios.cache_api import (  # noqa: E402
    assert_api_surfaces_agree,
    assert_cache_paths_deterministic,
    run_cache_paths,
)

SMALL = {"trials": 1, "prompt_len": 24, "new_tokens": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenized(model_dir, tmp_path_factory):
    return with_tokenizer(model_dir, tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="module")
def invariant(tokenized, tmp_path_factory):
    with ReferenceServerEngine(tokenized, deterministic=True, prefix_cache=True, threads=1,
                               log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


def test_every_cache_path_passes_with_its_hit_witnessed(invariant):
    report = assert_cache_paths_deterministic(invariant, **SMALL)
    by_path = {p.path: p for p in report.paths}
    assert set(by_path) == {"prefix", "decode_kv"} and all(p.witnessed for p in report.paths), report.render()
    assert by_path["decode_kv"].hit > SMALL["prompt_len"], report.render()  # reached into turn 1's decode KV
    assert all(p.metric_hit == p.hit for p in report.paths), report.render()  # /metrics agrees with meta_info


def test_every_api_surface_gives_the_same_bits_with_the_seed_witnessed(invariant, tokenized):
    from pytest_miles.engines.reference import ReferenceEngine

    offline = ReferenceEngine(tokenized, deterministic=True)  # in process, as sglang.Engine is offline
    report = assert_api_surfaces_agree(invariant, offline, requests=1, prompt_len=12)
    assert report.surfaces == ["/generate", "/v1/completions", "/v1/chat/completions", "reference (in process)"], \
        report.render()
    assert report.seed_witnessed and not report.not_applicable, report.render()
    assert all(r.prompt_ids["/v1/chat/completions"] == r.prompt for r in report.requests)  # the same request


def test_negative_control_a_cache_hit_that_changes_the_kv_is_caught(tokenized, tmp_path):
    with ReferenceServerEngine(tokenized, deterministic=True, prefix_cache=True, threads=1, log_dir=tmp_path,
                               fault="cache-hit-bf16-kv") as s:
        with pytest.raises(AssertionError, match=r"warm vs flushed \[cache state\]") as exc:
            assert_cache_paths_deterministic(s, **SMALL)
    assert "fault=cache-hit-bf16-kv" in str(exc.value)  # the report names the planted fault (server settings)


def test_negative_control_a_surface_that_drops_the_seed_is_caught(tokenized, tmp_path):
    with ReferenceServerEngine(tokenized, deterministic=True, threads=1, log_dir=tmp_path,
                               fault="completions-ignores-seed") as s:
        with pytest.raises(AssertionError, match="surfaces that differ: /v1/completions") as exc:
            assert_api_surfaces_agree(s, requests=1, prompt_len=12)
    assert "/v1/chat/completions vs" not in str(exc.value)


def test_without_a_cache_or_a_tokenizer_both_are_not_applicable_naming_why(model_dir, tmp_path):
    with ReferenceServerEngine(model_dir, deterministic=True, threads=1, log_dir=tmp_path) as s:
        with pytest.raises(NotApplicable, match="disable_radix_cache=true.*no prefix cache"):
            assert_cache_paths_deterministic(s, **SMALL)
        with pytest.raises(NotApplicable, match="(?s)fewer than two surfaces.*without a tokenizer.*no offline engine"):
            assert_api_surfaces_agree(s, requests=1, prompt_len=12)


def test_bad_inputs_are_named(invariant, tokenized):
    with pytest.raises(InputError, match="fault: 'nope' is not a planted fault"):
        ReferenceServerEngine(tokenized, fault="nope")
    with pytest.raises(InputError, match="object lacks generate_one, flush_cache"):
        run_cache_paths(object())
    with pytest.raises(InputError, match="offline: dict lacks generate_one"):
        assert_api_surfaces_agree(invariant, {})
    with pytest.raises(InputError, match="max_new_tokens must be >= 2"):
        from pytest_miles.engines.base import SamplingParams

        run_cache_paths(invariant, params=SamplingParams(max_new_tokens=1))
    with pytest.raises(InputError, match="params: expected a SamplingParams"):
        assert_api_surfaces_agree(invariant, params=[{"temperature": 0}])
