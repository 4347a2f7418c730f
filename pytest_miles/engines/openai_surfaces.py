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
from pytest_miles.models.tokenizer_vocab import SPACE, SPECIAL, decode, encode, text_ids

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
    return answer["choices"][0]


def parse_completion(answer: Any) -> Output:
    """choices[0]: token_ids, logprobs.token_logprobs, logprobs.top_logprobs ({text: logprob})."""
    ch = _choice(answer, "/v1/completions")
    lp = ch.get("logprobs") or {}
    ids = ch.get("token_ids")
    if ids is None:
        ids = [token_id(t) for t in lp.get("tokens") or []]
    top = [{token_id(t): float(v) for t, v in (row or {}).items()} for row in lp.get("top_logprobs") or []]
    return Output([int(t) for t in ids], [float(v) for v in lp.get("token_logprobs") or []], None, top)


def parse_chat(answer: Any) -> tuple[Output, list[int] | None]:
    """choices[0]: token_ids, logprobs.content[] ({token, logprob, top_logprobs: [{token, logprob}]}),
    and the prompt ids the chat template produced (prompt_token_ids), when the server returns them."""
    ch = _choice(answer, "/v1/chat/completions")
    content = (ch.get("logprobs") or {}).get("content") or []
    ids = ch.get("token_ids")
    if ids is None:
        ids = [token_id(c["token"]) for c in content]
    top = [{token_id(t["token"]): float(t["logprob"]) for t in c.get("top_logprobs") or []} for c in content]
    if not any(top):
        top = []
    out = Output([int(t) for t in ids], [float(c["logprob"]) for c in content], None, top)
    prompt = ch.get("prompt_token_ids")
    return out, (None if prompt is None else [int(t) for t in prompt])


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
    return prompt, _params(req, req.get("max_tokens", 16)), int(req.get("logprobs") or 0)


def chat_request(req: dict) -> tuple[list[int], SamplingParams, int]:
    """prompt ids (the chat template: the contents concatenated), sampling parameters and top-k."""
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("messages: expected a non-empty list of {role, content}")
    prompt = encode("".join(str(m.get("content") or "") for m in msgs))
    if not prompt:
        raise ValueError("messages: the chat template gives an empty prompt")
    k = int(req.get("top_logprobs") or 0) if req.get("logprobs") else 0
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
