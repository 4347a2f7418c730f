"""SGLang's OpenAI-compatible surfaces, both sides, as SGLang 0.5.17's released source has them
(sglang/srt/entrypoints/openai/serving_completions.py, serving_chat.py, protocol.py):

- /v1/completions: `prompt` a list of token ids (or text), `seed` (mapped to sampling_seed),
  `logprobs: k` (return_logprob, top_logprobs_num=k), `return_token_ids` (choices[].token_ids);
  the logprobs come keyed by token TEXT (to_openai_style_logprobs: tokens, token_logprobs,
  top_logprobs as {text: logprob}), so the surface needs a tokenizer (with --skip-tokenizer-init
  the answer has no "text" and the handler fails).
- /v1/chat/completions: `messages` through the tokenizer's chat template, `seed`, `logprobs: true`
  and `top_logprobs: k` (choices[].logprobs.content[] of {token, bytes, logprob, top_logprobs}),
  `return_token_ids` (output and prompt ids; not with streaming).

The client half turns each answer into an `Output` (ids, chosen logprobs, top-k maps keyed by id,
read back through the embedded tokenizer's vocabulary); the server half gives the embedded
reference server the same request and answer shapes. Engines never judge: nothing here compares."""

from __future__ import annotations

import time
from typing import Any

from pytest_miles.engines.base import EngineError, Output, SamplingParams
from pytest_miles.engines.sglang_answers import ids_of, logprob_of, unreadable
from pytest_miles.models.tokenizer_vocab import SPACE, SPECIAL, decode, encode, text_ids
from pytest_miles.validation import top_k_of

SURFACES = ("/generate", "/v1/completions", "/v1/chat/completions", "sglang.Engine")


def token_text(token_id: int) -> str:
    """The embedded tokenizer's text of one id (models/tokenizer_vocab.py)."""
    if token_id < len(SPECIAL):
        return SPECIAL[token_id]
    return decode([token_id]) if token_id in text_ids() else f"<t{token_id}>"


def token_id(text: str) -> int:
    """The id of one token's text (the inverse of token_text); EngineError for a text the embedded
    tokenizer cannot have produced (the engine serves another tokenizer)."""
    if text in SPECIAL:
        return SPECIAL.index(text)
    if text == SPACE:  # the vocabulary's own form of " " (a server that answers token strings, not their text)
        return encode(" ")[0]
    if len(text) == 1 and 32 <= ord(text) < 127:
        return encode(text)[0]
    if text.startswith("<t") and text.endswith(">") and text[2:-1].isdigit():
        return int(text[2:-1])
    raise EngineError(f"token text {text!r} is not one of the embedded tokenizer's tokens: the engine serves "
                      "another tokenizer, so its text-keyed logprobs cannot be read back as token ids")


def _openai_sampling(params: SamplingParams) -> dict[str, Any]:
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p,
            "seed": params.sampling_seed, "ignore_eos": params.ignore_eos}


# -- the client half ---------------------------------------------------------------------------


def completions_payload(prompt: list[int], params: SamplingParams, top_logprobs: int) -> dict[str, Any]:
    return {"model": "default", "prompt": list(prompt), "max_tokens": params.max_new_tokens,
            "logprobs": int(top_logprobs), "return_token_ids": True, "stream": False, **_openai_sampling(params)}


def chat_payload(prompt: list[int], params: SamplingParams, top_logprobs: int) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": decode(prompt)}],
            "max_completion_tokens": params.max_new_tokens, "logprobs": True, "top_logprobs": int(top_logprobs),
            "return_token_ids": True, "stream": False, **_openai_sampling(params)}


def _choice(answer: Any, surface: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not answer.get("choices"):
        raise EngineError(f"{surface} answered {answer!r:.300} (expected an object with choices)")
    choices = answer["choices"]
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise unreadable(surface, "choices is not a list of objects", answer)
    return choices[0]


def _object(value: Any, surface: str, field: str, answer: Any) -> dict[str, Any]:
    """An optional object: null is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise unreadable(surface, f"{field} is not an object", answer)
    return value


def _rows(value: Any, surface: str, field: str, answer: Any) -> list:
    """An optional list: null is an empty one."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise unreadable(surface, f"{field} is not a list", answer)
    return value


def _token(text: Any, surface: str, field: str, answer: Any) -> int:
    if not isinstance(text, str):
        raise unreadable(surface, f"{field} is not a token's text: {text!r:.80}", answer)
    return token_id(text)


def parse_completion(answer: Any) -> Output:
    """choices[0]: token_ids, logprobs.token_logprobs, logprobs.top_logprobs ({text: logprob}), each checked:
    another shape is one EngineError naming the field (sglang_answers.unreadable)."""
    where = "/v1/completions"
    ch = _choice(answer, where)
    lp = _object(ch.get("logprobs"), where, "choices[0].logprobs", answer)
    ids = ch.get("token_ids")
    if ids is None:
        ids = [_token(t, where, "choices[0].logprobs.tokens[]", answer)
               for t in _rows(lp.get("tokens"), where, "choices[0].logprobs.tokens", answer)]
    ids = ids_of(ids, where, "choices[0].token_ids", answer)
    top = []
    for i, row in enumerate(_rows(lp.get("top_logprobs"), where, "choices[0].logprobs.top_logprobs", answer)):
        field = f"choices[0].logprobs.top_logprobs[{i}]"
        top.append({_token(t, where, field, answer): logprob_of(v, where, field, answer)
                    for t, v in _object(row, where, field, answer).items()})
    chosen = [logprob_of(v, where, f"choices[0].logprobs.token_logprobs[{i}]", answer)
              for i, v in enumerate(_rows(lp.get("token_logprobs"), where, "choices[0].logprobs.token_logprobs",
                                          answer))]
    return Output(ids, chosen, None, top)


def parse_chat(answer: Any) -> tuple[Output, list[int] | None]:
    """choices[0]: token_ids, logprobs.content[] ({token, logprob, top_logprobs: [{token, logprob}]}),
    and the prompt ids the chat template produced (prompt_token_ids), when the server returns them; each
    checked as parse_completion's."""
    where = "/v1/chat/completions"
    ch = _choice(answer, where)
    content = _rows(_object(ch.get("logprobs"), where, "choices[0].logprobs", answer).get("content"), where,
                    "choices[0].logprobs.content", answer)
    given = ch.get("token_ids")
    ids, chosen, top = [], [], []
    for i, c in enumerate(content):
        field = f"choices[0].logprobs.content[{i}]"
        c = _object(c, where, field, answer)
        if given is None:  # the ids read back from the texts only where the server gave none
            ids.append(_token(c.get("token"), where, f"{field}.token", answer))
        chosen.append(logprob_of(c.get("logprob"), where, f"{field}.logprob", answer))
        rows = [_object(t, where, f"{field}.top_logprobs[]", answer)
                for t in _rows(c.get("top_logprobs"), where, f"{field}.top_logprobs", answer)]
        top.append({_token(t.get("token"), where, f"{field}.top_logprobs[].token", answer):
                    logprob_of(t.get("logprob"), where, f"{field}.top_logprobs[].logprob", answer) for t in rows})
    if given is not None:
        ids = ids_of(given, where, "choices[0].token_ids", answer)
    if not any(top):
        top = []
    prompt = ch.get("prompt_token_ids")
    return Output(ids, chosen, None, top), (None if prompt is None else
                                            ids_of(prompt, where, "choices[0].prompt_token_ids", answer))


def complete_one(engine: Any, prompt: list[int], params: SamplingParams, top_logprobs: int = 0) -> Output:
    """One request through a server's /v1/completions (token-id prompt, `seed`)."""
    return parse_completion(engine._post("/v1/completions", completions_payload(prompt, params, top_logprobs)))


def chat_one(engine: Any, prompt: list[int], params: SamplingParams, top_logprobs: int = 0
             ) -> tuple[Output, list[int] | None]:
    """One request through a server's /v1/chat/completions: the prompt's text as one user message."""
    return parse_chat(engine._post("/v1/chat/completions", chat_payload(prompt, params, top_logprobs)))


# -- the server half (the embedded reference server) --------------------------------------------


def completion_request(req: dict) -> tuple[list[int], SamplingParams, int]:
    """prompt ids, sampling parameters and top-k of a /v1/completions body (seed -> sampling_seed)."""
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        prompt = encode(prompt)
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
        raise ValueError("prompt: expected a non-empty list of token ids or a string")
    return prompt, _params(req, req.get("max_tokens", 16)), top_k_of(req, "logprobs")


def chat_request(req: dict) -> tuple[list[int], SamplingParams, int]:
    """prompt ids (the chat template: the contents concatenated), sampling parameters and top-k."""
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("messages: expected a non-empty list of {role, content}")
    prompt = encode("".join(str(m.get("content") or "") for m in msgs))
    if not prompt:
        raise ValueError("messages: the chat template gives an empty prompt")
    k = top_k_of(req, "top_logprobs") if req.get("logprobs") else 0
    return prompt, _params(req, req.get("max_completion_tokens") or req.get("max_tokens") or 16), k


def _params(req: dict, max_new: int) -> SamplingParams:
    fields = {"temperature": req.get("temperature"), "top_p": req.get("top_p"), "top_k": req.get("top_k"),
              "min_p": req.get("min_p"), "sampling_seed": req.get("seed"), "max_new_tokens": max_new}
    return SamplingParams(**{k: v for k, v in fields.items() if v is not None or k == "sampling_seed"})


def _logprob_rows(r: Any) -> tuple[list[str], list[dict[str, float]]]:
    texts = [token_text(t) for t in r.output_ids]
    tops = [{token_text(t): lp for t, lp in row} for row in r.top] if r.top_logprobs else []
    return texts, tops


def completion_answer(r: Any, want_logprobs: bool, token_ids: bool) -> dict:
    texts, tops = _logprob_rows(r)
    lp = {"text_offset": [-1] * len(texts), "token_logprobs": list(r.logprobs), "tokens": texts,
          "top_logprobs": tops} if want_logprobs else None
    choice = {"index": 0, "text": "".join(texts), "logprobs": lp, "finish_reason": "length", "matched_stop": None,
              "token_ids": list(r.output_ids) if token_ids else None,
              "prompt_token_ids": list(r.prompt) if token_ids else None}
    return {"id": str(r.rid), "object": "text_completion", "created": int(time.time()), "model": "default",
            "choices": [choice], "usage": _usage(r)}


def chat_answer(r: Any, want_logprobs: bool, token_ids: bool) -> dict:
    texts, tops = _logprob_rows(r)
    content = [{"token": t, "bytes": list(t.encode()), "logprob": lp,
                "top_logprobs": [{"token": k, "bytes": list(k.encode()), "logprob": v}
                                 for k, v in (tops[i].items() if tops else ())]}
               for i, (t, lp) in enumerate(zip(texts, r.logprobs))]
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(texts), "reasoning_content": None,
                                      "tool_calls": None},
              "logprobs": {"content": content} if want_logprobs else None, "finish_reason": "length",
              "matched_stop": None, "token_ids": list(r.output_ids) if token_ids else None,
              "prompt_token_ids": list(r.prompt) if token_ids else None}
    return {"id": str(r.rid), "object": "chat.completion", "created": int(time.time()), "model": "default",
            "choices": [choice], "usage": _usage(r)}


def _usage(r: Any) -> dict:
    n = len(r.output_ids)
    return {"prompt_tokens": len(r.prompt), "completion_tokens": n, "total_tokens": len(r.prompt) + n,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}
