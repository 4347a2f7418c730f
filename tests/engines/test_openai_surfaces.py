"""SGLang's OpenAI answers read back as token ids (the shapes of SGLang 0.5.17's serving_completions
and serving_chat), and the embedded tokenizer's text of every id read back to that id."""

from __future__ import annotations

import pytest

from pytest_miles.engines import openai_surfaces as oa
from pytest_miles.engines.base import EngineError, SamplingParams


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
