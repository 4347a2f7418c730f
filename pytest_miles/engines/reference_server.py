"""`python -m pytest_miles.engines.reference_server --model DIR --port P`: the embedded engine
behind the subset of SGLang's HTTP API the checks use (/health, /generate, /flush_cache,
/get_server_info, /update_weights_from_disk, /get_weights_by_name with SGLang's request and
answer: engines/weights_by_name.py).
Requests are served one at a time, each list of input_ids as one batch."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pytest_miles.engines.base import SamplingParams
from pytest_miles.engines.reference import ReferenceEngine
from pytest_miles.models.weights_by_name import FAILED, json_value, parse_request


class Handler(BaseHTTPRequestHandler):
    """SGLang's HTTP surface over one ReferenceEngine (`engine`), requests serialised by `lock`."""

    engine: ReferenceEngine
    lock: threading.Lock

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
        if self.path == "/get_server_info":  # as SGLang: the effective settings (no radix cache here)
            return self._send(200, self.engine.server_info())
        if self.path == "/get_weights_by_name":  # SGLang takes GET or POST, the request in the body
            return self._weights(self._body())
        self._send(404, {"error": self.path})

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
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
        if self.path == "/flush_cache":
            return self._send(200, {})
        if self.path == "/update_weights_from_disk":  # SGLang's answer shape: success + message
            try:
                with self.lock:
                    self.engine.update_weights_from_disk(req["model_path"])
                return self._send(200, {"success": True, "message": "Succeeded to update model weights."})
            except (KeyError, TypeError, OSError, ValueError, RuntimeError) as exc:
                return self._send(400, {"success": False, "message": f"{type(exc).__name__}: {exc}"})
        if self.path != "/generate":
            return self._send(404, {"error": self.path})
        try:
            with self.lock:
                self._send(200, _generate(self.engine, req))
        except (ValueError, KeyError, TypeError) as exc:
            self._send(400, {"error": str(exc)})

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
    args = ap.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engine = ReferenceEngine(args.model, deterministic=args.deterministic, device=args.device)
    handler = type("EngineHandler", (Handler,), {"engine": engine, "lock": threading.Lock()})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    print(f"reference server on {args.host}:{args.port}", flush=True)
    server.serve_forever()


def _generate(engine: ReferenceEngine, req: dict):
    ids = req["input_ids"]
    single = bool(ids) and isinstance(ids[0], int)
    batch = [ids] if single else ids
    sp = req.get("sampling_params") or {}
    start = req.get("logprob_start_len")
    if isinstance(sp, list) and len(sp) != len(batch):
        raise ValueError(f"sampling_params: {len(sp)} given for {len(batch)} prompts")
    if start is not None and start >= 0:  # scoring: input token logprobs from one prefill
        seq = batch[0]
        lps = engine.score(seq[:1], seq[1:])  # logprob of every input token after the first
        rows = [[None, seq[0], None]] + [[lp, t, None] for lp, t in zip(lps, seq[1:])]
        return {"output_ids": [], "meta_info": {"input_token_logprobs": rows[start:],
                                                "output_token_logprobs": []}}
    outs = engine.generate(batch, [_params(s) for s in sp] if isinstance(sp, list) else _params(sp))
    res = [{"output_ids": o.output_ids,
            "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(o.logprobs, o.output_ids)],
                          "cached_tokens": 0}}
           for o in outs]
    return res[0] if single else res


def _params(sp: dict) -> SamplingParams:
    return SamplingParams(**{k: sp[k] for k in SamplingParams.__dataclass_fields__ if k in sp})


if __name__ == "__main__":
    main()
