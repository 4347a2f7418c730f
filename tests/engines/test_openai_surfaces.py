"""SGLang's OpenAI answers read back as token ids (the shapes of SGLang 0.5.17's serving_completions
and serving_chat), and the embedded tokenizer's text of every id read back to that id."""

from __future__ import annotations

import math
import random

import pytest

from pytest_miles.engines import openai_surfaces as oa
from pytest_miles.engines.base import EngineError, SamplingParams
from tests.helpers.mutate import mutate


def test_every_token_text_reads_back_to_its_id():
    assert all(oa.token_id(oa.token_text(i)) == i for i in range(512))
    with pytest.raises(EngineError, match="not one of the embedded tokenizer's tokens"):
        oa.token_id("hello")


def test_completion_and_chat_answers_parse_to_ids_logprobs_and_top_k():
    a, b = oa.token_text(5), oa.token_text(300)
    completion = {"choices": [{"text": a + b, "logprobs": {"tokens": [a, b], "token_logprobs": [-0.5, -1.25],
                                                           "top_logprobs": [{a: -0.5, b: -2.0}, {b: -1.25}]}}]}
    out = oa.parse_completion(completion)  # no token_ids: read back from the texts
    assert out.output_ids == [5, 300] and out.logprobs == [-0.5, -1.25] and out.top_logprobs[0] == {5: -0.5, 300: -2.0}
    chat = {"choices": [{"token_ids": [5], "prompt_token_ids": [7, 8], "logprobs": {"content": [
        {"token": a, "logprob": -0.5, "top_logprobs": [{"token": b, "logprob": -2.0}]}]}}]}
    got, prompt = oa.parse_chat(chat)
    assert got.output_ids == [5] and got.top_logprobs == [{300: -2.0}] and prompt == [7, 8]
    with pytest.raises(EngineError, match="expected an object with choices"):
        oa.parse_completion({"object": "error", "message": "no tokenizer"})


def test_requests_carry_the_seed_and_the_sampling_parameters():
    p = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=3, sampling_seed=11)
    c, ch = oa.completions_payload([5, 6], p, 4), oa.chat_payload([5, 6], p, 4)
    assert c["seed"] == ch["seed"] == 11 and c["logprobs"] == 4 and ch["top_logprobs"] == 4 and ch["logprobs"]
    assert c["prompt"] == [5, 6] and ch["messages"][0]["content"] == oa.token_text(5) + oa.token_text(6)
    assert oa.completion_request(c)[1] == oa.chat_request(ch)[1] == p


A, B = oa.token_text(5), oa.token_text(300)
# as SGLang 0.5.17's serving_completions / serving_chat answer with logprobs and return_token_ids
COMPLETION = {"id": "c1", "object": "text_completion", "choices": [{
    "index": 0, "text": A + B, "token_ids": [5, 300], "prompt_token_ids": [7, 8], "finish_reason": "length",
    "logprobs": {"text_offset": [-1, -1], "tokens": [A, B], "token_logprobs": [-0.5, -1.25],
                 "top_logprobs": [{A: -0.5, B: -2.0}, {B: -1.25}]}}]}
CHAT = {"id": "c2", "object": "chat.completion", "choices": [{
    "index": 0, "message": {"role": "assistant", "content": A}, "token_ids": [5], "prompt_token_ids": [7, 8],
    "logprobs": {"content": [{"token": A, "bytes": [1], "logprob": -0.5,
                              "top_logprobs": [{"token": B, "bytes": [2], "logprob": -2.0}]}]}}]}


def test_a_null_logprob_is_nan_as_orjson_writes_it():
    """SGLang answers with orjson, which writes NaN and +-Infinity as null: a NaN for the checks to judge."""
    completion = {"choices": [{"token_ids": [5], "logprobs": {"token_logprobs": [None], "top_logprobs": [{A: None}]}}]}
    out = oa.parse_completion(completion)
    assert math.isnan(out.logprobs[0]) and math.isnan(out.top_logprobs[0][5])
    chat = {"choices": [{"logprobs": {"content": [{"token": A, "logprob": None, "top_logprobs": []}]}}]}
    got, prompt = oa.parse_chat(chat)
    assert got.output_ids == [5] and math.isnan(got.logprobs[0]) and prompt is None


@pytest.mark.parametrize("parse, answer, says", [
    (oa.parse_completion, {"choices": {"0": {}}}, "choices is not a list of objects"),
    (oa.parse_completion, {"choices": ["x"]}, "choices is not a list of objects"),
    (oa.parse_completion, {"choices": [{"logprobs": []}]}, "choices[0].logprobs is not an object"),
    (oa.parse_completion, {"choices": [{"token_ids": [-1]}]}, "choices[0].token_ids is not a list of token ids"),
    (oa.parse_completion, {"choices": [{"logprobs": {"tokens": [5]}}]}, "tokens[] is not a token's text"),
    (oa.parse_completion, {"choices": [{"token_ids": [], "logprobs": {"token_logprobs": ["-0.5"]}}]},
     "choices[0].logprobs.token_logprobs[0] is not a logprob"),
    (oa.parse_completion, {"choices": [{"token_ids": [], "logprobs": {"top_logprobs": [[A]]}}]},
     "choices[0].logprobs.top_logprobs[0] is not an object"),
    (oa.parse_chat, {"choices": [{"logprobs": {"content": {}}}]}, "choices[0].logprobs.content is not a list"),
    (oa.parse_chat, {"choices": [{"logprobs": {"content": [{"token": None}]}}]}, "content[0].token is not a token"),
    (oa.parse_chat, {"choices": [{"token_ids": [], "logprobs": {"content": [{"logprob": True}]}}]},
     "content[0].logprob is not a logprob"),
    (oa.parse_chat, {"choices": [{"token_ids": [1], "prompt_token_ids": "7 8"}]}, "prompt_token_ids is not a list"),
])
def test_another_shape_is_one_engine_error_naming_the_field(parse, answer, says):
    with pytest.raises(EngineError) as exc:
        parse(answer)
    assert "answered something this client cannot read" in str(exc.value) and says in str(exc.value), str(exc.value)


@pytest.mark.parametrize("parse, answer", [(oa.parse_completion, COMPLETION), (oa.parse_chat, CHAT)])
def test_damaged_answers_are_read_or_named(parse, answer):
    """Seeded: the answer's fields removed, added or replaced by values of every other type: each is read or is one
    EngineError (a field named, or a token text the embedded tokenizer cannot have produced)."""
    parse(answer)
    rng, outcomes = random.Random(f"openai-answers-{parse.__name__}"), {"read": 0, "named": 0}
    for _ in range(600):
        try:
            parse(mutate(answer, rng))
            outcomes["read"] += 1
        except EngineError as exc:
            assert str(exc).startswith("/v1/") or "not one of the embedded tokenizer's tokens" in str(exc), str(exc)
            outcomes["named"] += 1
    assert outcomes["read"] and outcomes["named"], outcomes
