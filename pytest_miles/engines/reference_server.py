"""`python -m pytest_miles.engines.reference_server --model DIR --port P`: the embedded engine
behind the subset of SGLang's HTTP API the checks use (/health, /generate, /flush_cache,
/get_server_info, /update_weights_from_disk, /get_weights_by_name with SGLang's request and
answer: engines/weights_by_name.py, /metrics in Prometheus text, /v1/completions and
/v1/chat/completions in SGLang's format: engines/openai_surfaces.py, when the model folder has a
tokenizer, as SGLang needs one for them).
/generate goes through a dynamic-batching scheduler (engines/scheduler.py): concurrent requests
share steps, a bounded token pool (--max-total-tokens) retracts requests when it runs short,
--chunked-prefill-size chunks long prompts, --enable-prefix-cache reuses KV; `stream: true`
answers server-sent events as SGLang does; `top_logprobs_num` adds the top-k logprob maps.
`--fault` plants one named fault, for negative controls only (FAULTS)."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pytest_miles.engines.base import SamplingParams
from pytest_miles.engines.reference import ReferenceEngine
from pytest_miles.engines.scheduler import Scheduler
from pytest_miles.errors import InputError
from pytest_miles.models.weights_by_name import FAILED, json_value, parse_request
from pytest_miles.validation import integer, top_k_of

# Planted faults (negative controls only): what each one breaks.
FAULTS = {
    "cache-hit-bf16-kv": "KV read from the prefix cache is rounded through bfloat16 (a cache hit changes the bits)",
    "completions-ignores-seed": "/v1/completions drops the request's seed (one API surface samples differently)",
}


class Handler(BaseHTTPRequestHandler):
    """SGLang's HTTP surface over one ReferenceEngine (`engine`), requests serialised by `lock`."""

    engine: ReferenceEngine
    lock: threading.Lock
    scheduler: Scheduler
    tokenizer: bool = False  # the model folder has one: the OpenAI surfaces answer
    fault: str | None = None

    def _send(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            return self._send(200, {"ok": True})
        if self.path == "/get_server_info":  # as SGLang: the effective settings and the scheduler's counters
            return self._send(200, {**server_info(self.engine, self.scheduler), "skip_tokenizer_init":
                                    not self.tokenizer, "fault": self.fault})
        if self.path == "/metrics":
            data = prometheus(self.scheduler.metrics()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if self.path == "/get_weights_by_name":  # SGLang takes GET or POST, the request in the body
            return self._weights(self._body())
        self._send(404, {"error": self.path})

    def _body(self):
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if not 0 <= n <= MAX_BODY:
                raise ValueError(f"Content-Length {n} outside [0, {MAX_BODY}]")
            return json.loads(self.rfile.read(n) or b"null")
        except ValueError as exc:
            return exc

    def _weights(self, req) -> None:
        """SGLang's answer: 200 with the rows, 400 "Get parameter by name failed" for None, 422
        for a body GetWeightsByNameReqInput does not validate."""
        try:
            if isinstance(req, ValueError):
                raise ValueError(f"body: not JSON ({req})")
            name, size = parse_request(req)
        except ValueError as exc:
            return self._send(422, {"detail": [{"msg": str(exc)}]})
        with self.lock:
            got = self.engine.weights_by_name(name, size)
        if got is None:
            return self._send(400, {"error": {"message": FAILED}})
        self._send(200, json_value(got))

    def do_POST(self) -> None:  # noqa: N802
        req = self._body()
        if self.path == "/get_weights_by_name":
            return self._weights(req)
        if isinstance(req, ValueError):
            return self._send(400, {"error": f"body: not JSON ({req})"})
        if not isinstance(req, dict) and self.path != "/flush_cache":
            return self._send(400, {"error": f"body: expected a JSON object, got {type(req).__name__}"})
        if self.path == "/flush_cache":  # as SGLang: 400 while requests are queued or running
            if self.scheduler.flush():
                return self._send(200, {})
            return self._send(400, {"error": "Cache not flushed because there are pending requests."})
        if self.path == "/update_weights_from_disk":  # SGLang's answer shape: success + message
            try:
                with self.lock:
                    path = req.get("model_path")
                    if not isinstance(path, str) or not path or "\x00" in path:
                        raise ValueError(f"model_path: expected a model folder's path, got {path!r:.80}")
                    self.engine.update_weights_from_disk(path)
                return self._send(200, {"success": True, "message": "Succeeded to update model weights."})
            except (KeyError, TypeError, OSError, ValueError, RuntimeError) as exc:
                return self._send(400, {"success": False, "message": f"{type(exc).__name__}: {exc}"})
        if self.path in ("/v1/completions", "/v1/chat/completions"):
            return self._openai(req)
        if self.path != "/generate":
            return self._send(404, {"error": self.path})
        try:
            start = req.get("logprob_start_len")  # SGLang's default -1: no input logprobs
            if start is not None and not (isinstance(start, int) and not isinstance(start, bool) and start < 0):
                with self.lock:
                    return self._send(200, _score(self.engine, req))
            reqs, single = _submit(self.engine, self.scheduler, req)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            return self._send(400, {"error": _bad_request(exc)})
        if req.get("stream") and single:
            return self._stream(reqs[0])
        for r in reqs:
            r.done.wait()
        errors = [r.error for r in reqs if r.error]
        if errors:
            return self._send(500, {"error": errors[0]})
        res = [_answer(r) for r in reqs]
        self._send(200, res[0] if single else res)

    def _openai(self, req) -> None:
        """SGLang's OpenAI surfaces (non-streaming), as its serving_completions / serving_chat answer."""
        from pytest_miles.engines import openai_surfaces as oa

        chat = self.path.endswith("/chat/completions")
        if not self.tokenizer:  # SGLang with --skip-tokenizer-init: no text, no chat template
            return self._send(400, {"object": "error", "type": "BadRequestError", "code": 400, "message":
                                    f"{self.path} needs a tokenizer; this server runs without one"})
        try:
            prompt, params, k = (oa.chat_request if chat else oa.completion_request)(req)
            if self.fault == "completions-ignores-seed" and not chat:
                params = SamplingParams(**{**vars(params), "sampling_seed": None})
            self.engine._check([prompt])
            r = self.scheduler.submit(prompt, params, k)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            return self._send(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                    "message": _bad_request(exc)})
        r.done.wait()
        if r.error:
            return self._send(500, {"object": "error", "code": 500, "message": r.error})
        logprobs = bool(req.get("logprobs")) if chat else req.get("logprobs") is not None
        answer = oa.chat_answer if chat else oa.completion_answer
        self._send(200, answer(r, logprobs, bool(req.get("return_token_ids"))))

    def _stream(self, r) -> None:
        """SGLang's server-sent events: one `data: {json}` per new token (output_ids cumulative),
        then `data: [DONE]`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        sent = 0
        while True:
            with r.updated:  # ids, logprobs and top-k rows are appended together under this lock
                if len(r.output_ids) == sent and not r.done.is_set():
                    r.updated.wait(timeout=1.0)
                n = len(r.output_ids)
                event = _answer(r, n) if n > sent else None
            if event is not None:
                sent = n
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()
            if r.done.is_set() and sent == len(r.output_ids):
                break
        if r.error:
            self.wfile.write(b"data: " + json.dumps({"error": r.error}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def log_message(self, *a) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--max-total-tokens", type=int, default=None, help="the KV token pool (default: unbounded)")
    ap.add_argument("--chunked-prefill-size", type=int, default=None, help="prefill tokens per step")
    ap.add_argument("--max-running-requests", type=int, default=None)
    ap.add_argument("--enable-prefix-cache", action="store_true", help="reuse KV of earlier requests")
    ap.add_argument("--fault", choices=sorted(FAULTS), default=None, help="plant a fault (negative controls only)")
    args = ap.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engine = ReferenceEngine(args.model, deterministic=args.deterministic, device=args.device)
    lock = threading.Lock()
    sched = Scheduler(engine, max_total_tokens=args.max_total_tokens, chunked_prefill_size=args.chunked_prefill_size,
                      max_running_requests=args.max_running_requests, prefix_cache=args.enable_prefix_cache, lock=lock,
                      kv_on_hit=_bf16_kv if args.fault == "cache-hit-bf16-kv" else None)
    from pytest_miles.models.tokenizer_vocab import has_tokenizer

    handler = type("EngineHandler", (Handler,), {"engine": engine, "lock": lock, "scheduler": sched,
                                                 "tokenizer": has_tokenizer(args.model), "fault": args.fault})
    ThreadingHTTPServer.request_queue_size = 1024  # hundreds of concurrent clients, as a rollout has
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.host, args.port), handler)
    print(f"reference server on {args.host}:{args.port}", flush=True)
    server.serve_forever()


def _bf16_kv(kv: list) -> list:
    """The planted cache-hit fault: cached KV rounded through bfloat16."""
    import torch

    return [(k.to(torch.bfloat16).to(k.dtype), v.to(torch.bfloat16).to(v.dtype)) for k, v in kv]


def _input_ids(req: dict) -> list:
    if "input_ids" not in req:
        raise ValueError("input_ids: field required (a list of token ids, or one such list per prompt)")
    return req["input_ids"]


def _score(engine: ReferenceEngine, req: dict):
    """Input token logprobs from one prefill (logprob_start_len >= 0)."""
    ids = _input_ids(req)
    seq = ids if isinstance(ids, list) and ids and isinstance(ids[0], int) else (
        ids[0] if isinstance(ids, list) and len(ids) == 1 else None)
    if not isinstance(seq, list) or len(seq) < 2:
        raise ValueError("input_ids: expected one list of at least 2 token ids to score")
    engine._check([seq])
    start = integer("logprob_start_len", req["logprob_start_len"], minimum=0, maximum=len(seq) - 1)
    lps = engine.score(seq[:1], seq[1:])  # logprob of every input token after the first
    rows = [[None, seq[0], None]] + [[lp, t, None] for lp, t in zip(lps, seq[1:])]
    return {"output_ids": [], "meta_info": {"input_token_logprobs": rows[start:],
                                            "output_token_logprobs": []}}


MAX_BODY = 64 << 20  # bytes a request body may have


def _bad_request(exc: Exception) -> str:
    """A refused request's message: ours as they are, anything else with its type (a KeyError's text is the key)."""
    return str(exc) if type(exc) in (ValueError, InputError) else f"{type(exc).__name__}: {exc}"


def _submit(engine: ReferenceEngine, sched: Scheduler, req: dict):
    ids = _input_ids(req)
    single = bool(ids) and isinstance(ids[0], int)
    batch = [ids] if single else ids
    engine._check(batch)
    sp = req.get("sampling_params") or {}
    if isinstance(sp, list) and len(sp) != len(batch):
        raise ValueError(f"sampling_params: {len(sp)} given for {len(batch)} prompts")
    params = [_params(s) for s in sp] if isinstance(sp, list) else [_params(sp)] * len(batch)
    k = top_k_of(req, "top_logprobs_num") if req.get("return_logprob", True) else 0
    limit = engine.config.max_position_embeddings
    for p, pr in zip(batch, params):
        if len(p) + pr.max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens exceeds the model's {limit} positions")
    return [sched.submit(p, pr, k) for p, pr in zip(batch, params)], single


def _answer(r, n: int | None = None) -> dict:
    n = len(r.output_ids) if n is None else n
    meta = {"output_token_logprobs": [[lp, t, None] for lp, t in zip(r.logprobs[:n], r.output_ids[:n])],
            "cached_tokens": r.cached_tokens, "num_retractions": r.retracted, "id": str(r.rid)}
    if r.top_logprobs:
        meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in row] for row in r.top[:n]]
    return {"output_ids": r.output_ids[:n], "meta_info": meta}


def server_info(engine: ReferenceEngine, sched: Scheduler) -> dict:
    info = engine.server_info()
    pool = sched.pool if sched.pool < 1 << 30 else None
    info.update({"disable_radix_cache": not sched.prefix_cache, "chunked_prefill_size": sched.chunk
                 if sched.chunk < 1 << 30 else None, "max_total_tokens": pool,
                 "max_running_requests": sched.max_running if sched.max_running < 1 << 30 else None,
                 "scheduler": "dynamic batching", "internal_states": [sched.metrics()]})
    if sched.prefix_cache:
        info["note"] = "the embedded reference server with its prefix cache on"
    return info


# The counters under SGLang's metric names where SGLang has one (sglang:num_running_reqs, ...);
# retractions, the largest batch and chunked prefills as cumulative counters of our own.
METRIC_NAMES = {
    "num_running_reqs": "sglang:num_running_reqs",
    "num_queue_reqs": "sglang:num_queue_reqs",
    "num_used_tokens": "sglang:num_used_tokens",
    "token_usage": "sglang:token_usage",
    "max_total_tokens": "sglang:max_total_num_tokens",
    "prompt_tokens": "sglang:prompt_tokens_total",
    "generation_tokens": "sglang:generation_tokens_total",
    "cached_tokens": "sglang:cached_tokens_total",
    "requests": "sglang:num_requests_total",
    "retractions": "sglang:num_retracted_requests_total",  # SGLang 0.5.17 metrics_collector.py:464
    "max_running_batch": "sglang:max_running_reqs_seen",
    "chunked_prefills": "sglang:chunked_prefills_total",
    "steps": "sglang:forward_steps_total",
    "cache_entries": "sglang:prefix_cache_entries",
}


def prometheus(metrics: dict) -> str:
    return "".join(
        f'{METRIC_NAMES[k]}{{model_name="embedded"}} {float(v)}\n' for k, v in metrics.items() if k in METRIC_NAMES
    )


def _params(sp: dict) -> SamplingParams:
    if not isinstance(sp, dict):
        raise ValueError(f"sampling_params: expected an object (or a list of one per prompt), got {sp!r:.80}")
    return SamplingParams(**{k: sp[k] for k in SamplingParams.__dataclass_fields__ if k in sp})


if __name__ == "__main__":
    main()
