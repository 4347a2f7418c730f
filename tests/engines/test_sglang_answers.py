"""SGLang /generate answers read with every field checked (engines/sglang_answers.py): the shapes SGLang 0.5.17
sends are read as before; any other shape is one EngineError naming the endpoint and the field."""

from __future__ import annotations

import math
import random

import pytest

from pytest_miles.engines.base import EngineError, Output
from pytest_miles.engines.sglang_answers import continuation_logprobs, output_of, token_logprobs
from tests.helpers.mutate import mutate

# as SGLang 0.5.17 answers /generate with return_logprob and top_logprobs_num 2 (text fields null when
# return_text_in_logprobs is off)
ANSWER = {
    "text": "", "output_ids": [17, 4],
    "meta_info": {"id": "a1", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3,
                  "completion_tokens": 2, "cached_tokens": 0, "num_retractions": 0,
                  "output_token_logprobs": [[-0.25, 17, None], [-1.5, 4, None]],
                  "output_top_logprobs": [[[-0.25, 17, None], [-2.0, 9, None]], [[-1.5, 4, None], [-1.75, 3, None]]]},
}


def test_sglang_s_answer_is_read():
    out = output_of(ANSWER, "e: /generate")
    assert out == Output([17, 4], [-0.25, -1.5], 0, [{17: -0.25, 9: -2.0}, {4: -1.5, 3: -1.75}], 0)
    no_ids = {**ANSWER, "output_ids": None}
    assert output_of(no_ids, "e").output_ids == [17, 4]  # taken from the logprob rows, as before
    nan = {"meta_info": {"output_token_logprobs": [[float("nan"), 3, None]]}}
    assert output_of(nan, "e").logprobs[0] != output_of(nan, "e").logprobs[0]  # a NaN is the checks' to judge
    assert token_logprobs([[None, 5, None], [-0.5, 6, None]], "e", "input_token_logprobs", {}, allow_none=True) \
        == [(None, 5), (-0.5, 6)]


@pytest.mark.parametrize("answer, says", [
    ({"error": {"message": "Bad Request"}}, "no meta_info object"),
    ("<html>502</html>", "no meta_info object"),
    ({"meta_info": {"output_token_logprobs": None}}, "meta_info.output_token_logprobs is not a list"),
    ({"meta_info": {"output_token_logprobs": [[-0.5, "17"]]}}, "meta_info.output_token_logprobs[0] is not [logprob"),
    ({"meta_info": {"output_token_logprobs": [[True, 17]]}}, "output_token_logprobs[0] is not [logprob"),
    ({"output_ids": ["a"], "meta_info": {"output_token_logprobs": [[-0.5, 1]]}}, "output_ids is not a list of"),
    ({"meta_info": {"output_token_logprobs": [], "cached_tokens": -1}}, "meta_info.cached_tokens is not a count"),
    ({"meta_info": {"output_token_logprobs": [], "output_top_logprobs": 3}}, "output_top_logprobs is not a list"),
])
def test_another_shape_is_one_engine_error_naming_the_field(answer, says):
    with pytest.raises(EngineError) as exc:
        output_of(answer, "sglang-1234: /generate")
    assert str(exc.value).startswith("sglang-1234: /generate answered something this client cannot read: ")
    assert says in str(exc.value), str(exc.value)


def test_damaged_answers_are_read_or_named():
    """Seeded: ANSWER's fields removed, added or replaced by values of every other type."""
    rng, outcomes = random.Random("sglang-answers"), {"read": 0, "named": 0}
    for _ in range(600):
        try:
            output_of(mutate(ANSWER, rng), "e: /generate")
            outcomes["read"] += 1
        except EngineError as exc:
            assert str(exc).startswith("e: /generate answered something"), str(exc)
            outcomes["named"] += 1
    assert outcomes["read"] and outcomes["named"], outcomes


def test_a_null_logprob_is_nan_as_orjson_writes_it():
    """SGLang 0.5.17 answers with orjson (sglang/srt/utils/json_response.py), which writes NaN and +-Infinity as
    null: a null output logprob is a NaN for the checks to judge, not an answer this client cannot read."""
    out = output_of({"meta_info": {"output_token_logprobs": [[None, 3, None], [-0.5, 4, None]],
                                   "output_top_logprobs": [[[None, 3, None]], None]}}, "e")
    assert math.isnan(out.logprobs[0]) and out.logprobs[1] == -0.5 and math.isnan(out.top_logprobs[0][3])
    assert token_logprobs([[None, 5, None]], "e", "input_token_logprobs", {}, allow_none=True) == [(None, 5)]


def test_continuation_located_by_ids_with_nulls_placed():
    pairs = [(None, 1), (-0.5, 2), (None, 3), (-0.25, 4)]  # position 0 has no logprob; position 2 was a NaN
    got = continuation_logprobs(pairs, [3, 4], start=0, name="e")
    assert math.isnan(got[0]) and got[1] == -0.25
    assert continuation_logprobs(pairs[1:], [2], start=1, name="e") == [-0.5]
    with pytest.raises(EngineError, match="do not contain the continuation's token ids"):
        continuation_logprobs(pairs, [1, 2], start=0, name="e")  # the first position has no logprob to give
    with pytest.raises(EngineError, match=r"got ids \[1, 2, 3, 4\]"):
        continuation_logprobs(pairs, [9], start=0, name="e")


def test_prometheus_samples_with_labels_and_timestamps():
    from pytest_miles.engines.base import parse_metrics

    text = ('# HELP sglang:num_running_reqs The number of running requests.\n'
            '# TYPE sglang:num_running_reqs gauge\n'
            'sglang:num_running_reqs{model_name="a b {c}",tp_rank="0"} 3.0\n'
            'sglang:num_running_reqs{model_name="x",tp_rank="1"} 2.0 1733390000000\n'
            'sglang:token_usage 0.25 1733390000000\n'
            'sglang:gen_throughput NaN\n'
            'sglang:broken\n'
            'sglang:bad{a="1"} x\n')
    got = parse_metrics(text)
    assert got["sglang:num_running_reqs"] == 5.0 and got["sglang:token_usage"] == 0.25, got
    assert math.isnan(got["sglang:gen_throughput"]) and "sglang:broken" not in got and "sglang:bad" not in got
