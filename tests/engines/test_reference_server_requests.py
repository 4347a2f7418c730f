"""The embedded reference server answers every request it is sent: seeded damage to each endpoint's request
(fields removed, added or replaced by values of every other type) gets a 200 or a 4xx naming what is wrong,
never a dropped connection, a 5xx from a crash or a server that stops answering (before: a temperature of 2**70
or a bool among the token ids killed its scheduler thread, after which every request waited forever)."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("torch")

from pytest_miles.engines.base import SamplingParams  # noqa: E402
from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.models.embedded import write_hf_checkpoint  # noqa: E402
from tests.helpers.http import request_json  # noqa: E402
from tests.helpers.mutate import mutate  # noqa: E402

REQUESTS = {  # a good request of each endpoint, as SGLang takes it
    "/generate": {"input_ids": [5, 6, 7], "return_logprob": True, "top_logprobs_num": 2,
                  "sampling_params": {"temperature": 0.7, "max_new_tokens": 3, "sampling_seed": 1}},
    "/generate#batch": {"input_ids": [[5, 6], [7, 8]],
                        "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 2, "temperature": 0}]},
    "/generate#score": {"input_ids": [5, 6, 7, 8], "return_logprob": True, "logprob_start_len": 2,
                        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}},
    "/v1/completions": {"prompt": [5, 6], "max_tokens": 3, "logprobs": 2, "seed": 1, "temperature": 0.7,
                        "return_token_ids": True},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "ab"}], "max_completion_tokens": 3,
                             "logprobs": True, "top_logprobs": 2, "seed": 1},
    "/get_weights_by_name": {"name": "model.embed_tokens.weight", "truncate_size": 2},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_hf_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer=True)
    with ReferenceServerEngine(model, deterministic=True, log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


def _post(server, path: str, body) -> tuple[int, dict]:
    return request_json(server.url + path.split("#")[0], body)


def _message(answer: dict) -> str:
    for key in ("error", "message", "detail"):
        if answer.get(key):
            return json.dumps(answer[key])
    return ""


def test_damaged_requests_are_answered_or_refused_by_name(server):
    reference = server.generate_one([5, 6, 7], SamplingParams(temperature=0.7, max_new_tokens=3, sampling_seed=1))
    rng, codes = random.Random("reference-server-requests"), {}
    for path, good in REQUESTS.items():
        assert _post(server, path, good)[0] == 200, path
        for _ in range(150):
            body = mutate(good, rng)
            code, answer = _post(server, path, body)
            codes[code] = codes.get(code, 0) + 1
            assert code == 200 or 400 <= code < 500, (path, body, code, answer)
            if code != 200:
                assert _message(answer) and "Traceback" not in _message(answer), (path, body, answer)
    assert codes.get(200) and sum(n for c, n in codes.items() if c != 200), codes
    assert server.responsive()
    again = server.generate_one([5, 6, 7], SamplingParams(temperature=0.7, max_new_tokens=3, sampling_seed=1))
    assert again == reference  # nothing a refused request did changed what a good one gets
    log = server.log_path.read_text()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-2000:]


@pytest.mark.parametrize("path, body, says", [
    ("/generate", {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 2**70, "max_new_tokens": 2}}, None),
    ("/generate", {"input_ids": [5, 6, True]}, "token id True outside the vocabulary"),
    ("/generate", [5, 6, 7], "body: expected a JSON object, got list"),
    ("/generate", {"sampling_params": {}}, "input_ids: field required"),
    ("/generate", {"input_ids": [5, 6], "sampling_params": 1.5}, "sampling_params: expected an object"),
    ("/generate", {"input_ids": [], "logprob_start_len": 2}, "input_ids: expected one list of at least 2"),
    ("/generate", {"input_ids": [5, 6, 7], "logprob_start_len": 9}, "logprob_start_len: 9 is not accepted"),
    ("/generate", {"input_ids": [5, 6], "top_logprobs_num": -1}, "top_logprobs_num: -1 is not accepted"),
    ("/v1/completions", {"prompt": [5, 6], "logprobs": float("inf")}, "logprobs: inf is not accepted"),
    ("/v1/completions", {"prompt": [5, 6], "logprobs": -1}, "logprobs: -1 is not accepted"),
    ("/v1/chat/completions", "hi", "body: expected a JSON object, got str"),
    ("/update_weights_from_disk", {"model_path": 3}, "model_path: expected a model folder's path"),
])
def test_one_request_one_answer(server, path, body, says):
    code, answer = _post(server, path, body)
    if says is None:
        assert code == 200, answer
    else:
        assert code == 400 and says in _message(answer), (code, answer)
    assert server.responsive()
