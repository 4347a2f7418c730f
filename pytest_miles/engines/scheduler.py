"""A dynamic-batching scheduler over the embedded model, as a serving engine has one: requests
arriving concurrently join one running batch; a bounded token pool (SGLang's max_total_tokens)
holds every running request's KV, so arrival order changes which requests share a step, and a
request is retracted (its KV freed, itself requeued and recomputed later) when the pool runs
short; prompts longer than the chunked-prefill budget are prefilled over several steps; an
optional prefix cache reuses KV written by earlier requests (prompt and decode alike).

Batch-invariant mode (`deterministic=True`) feeds every request one token at a time with its own
KV (every matmul has one row), so its bits cannot depend on what shares its step, on the chunk
boundaries or on a cache hit. With it off, one forward runs over the whole step (left-padded
rows, multi-token chunks), and BLAS picks its kernel by the shape, as on GPUs.

Counters (`metrics()`): retractions, cached (prefix-hit) tokens, the largest running batch,
chunked prefills, steps; `state()` is what the engine says about its queue and pool.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.engines.base import SamplingParams


@dataclass
class Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    top_logprobs: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    cached_tokens: int = 0
    retracted: int = 0
    kv: Any = None  # per layer (k, v) of [1, kv_heads, kv_len, d]
    kv_len: int = 0
    gen: Any = None
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    updated: threading.Condition = field(default_factory=threading.Condition)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output_ids

    @property
    def finished(self) -> bool:
        return len(self.output_ids) >= self.params.max_new_tokens


class Scheduler:
    """One thread runs steps while work is queued; `submit` returns a Request to wait on."""

    def __init__(self, engine, *, max_total_tokens: int | None = None, chunked_prefill_size: int | None = None,
                 max_running_requests: int | None = None, prefix_cache: bool = False,
                 lock: threading.Lock | None = None, cache_entries: int = 256, kv_on_hit: Any = None) -> None:
        for name, v in (("max_total_tokens", max_total_tokens), ("chunked_prefill_size", chunked_prefill_size),
                        ("max_running_requests", max_running_requests)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected an integer >= 1 or None, got {v!r}")
        self.engine = engine
        self.pool = max_total_tokens or 1 << 30
        self.chunk = chunked_prefill_size or 1 << 30
        self.max_running = max_running_requests or 1 << 30
        self.prefix_cache = prefix_cache
        self.cache: collections.OrderedDict[tuple[int, ...], Any] = collections.OrderedDict()
        self.cache_entries = cache_entries
        self.kv_on_hit = kv_on_hit  # a planted fault only (reference_server --fault): alters KV read from the cache
        self.lock = lock or threading.Lock()
        self.cv = threading.Condition()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.counters = {"retractions": 0, "cached_tokens": 0, "max_running_batch": 0, "chunked_prefills": 0,
                         "steps": 0, "requests": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self._next = 0
        self.thread = threading.Thread(target=self._loop, name="miles-scheduler", daemon=True)
        self.thread.start()

    # -- the outside -----------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, top_logprobs: int = 0) -> Request:
        import torch

        if len(prompt) + params.max_new_tokens > self.pool:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"max_total_tokens {self.pool}: the request could never be scheduled")
        with self.cv:
            self._next += 1
            req = Request(self._next, list(prompt), params, top_logprobs)
            req.gen = torch.Generator(device="cpu")
            req.gen.manual_seed(params.sampling_seed if params.sampling_seed is not None else 0)
            self.waiting.append(req)
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(prompt)
            self.cv.notify()
        return req

    def flush(self) -> bool:
        """Drop the prefix cache; False (as SGLang's 400) while requests are queued or running."""
        with self.cv:
            if self.waiting or self.running:
                return False
            self.cache.clear()
            return True

    def metrics(self) -> dict[str, int | float]:
        with self.cv:
            return {**self.counters, **self._gauges()}

    def _gauges(self) -> dict[str, int | float]:
        used = sum(r.kv_len for r in self.running)
        return {"num_running_reqs": len(self.running), "num_queue_reqs": len(self.waiting),
                "num_used_tokens": used, "max_total_tokens": self.pool if self.pool < 1 << 30 else -1,
                "token_usage": used / self.pool, "cache_entries": len(self.cache)}

    def state(self) -> dict[str, Any]:
        """The queue and pool as the engine sees them (for a stall report)."""
        with self.cv:
            return {**self._gauges(), "alive": self.thread.is_alive(),
                    "running": [(r.rid, len(r.prompt), len(r.output_ids), r.kv_len) for r in self.running],
                    "waiting": [(r.rid, len(r.prompt), len(r.output_ids)) for r in list(self.waiting)[:20]]}

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.running:
                    self.cv.wait()
                self._admit()
                work = self._plan()
            try:
                with self.lock:
                    self._forward(work)
            except Exception as exc:  # an engine error fails the step's requests, not the server
                with self.cv:
                    for req, _ in work:
                        req.error = f"{type(exc).__name__}: {exc}"
                        self._finish(req)
                continue
            self._after(work)

    def _need(self, req: Request) -> int:
        return len(req.tokens) - req.kv_len

    def _admit(self) -> None:
        """Admit waiting requests in arrival order, skipping over one that does not fit for a later
        one that does (the pool is filled, as SGLang's scheduler fills it); a retracted request
        waits at the front."""
        used = sum(len(r.tokens) for r in self.running)
        kept: collections.deque[Request] = collections.deque()
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting.popleft()
            if used + len(req.tokens) + 1 > self.pool and self.running:
                kept.append(req)
                if req.retracted or len(kept) >= 64:
                    break
                continue
            self._lookup(req)
            self.running.append(req)
            used += len(req.tokens)
        kept.extend(self.waiting)
        self.waiting = kept
        self.counters["max_running_batch"] = max(self.counters["max_running_batch"], len(self.running))

    def _lookup(self, req: Request) -> None:
        if not self.prefix_cache or req.kv_len:
            return
        toks, best, hit = req.tokens, 0, None
        for key in self.cache:
            n = 0
            limit = min(len(key), len(toks) - 1)  # at least one token left to compute
            while n < limit and key[n] == toks[n]:
                n += 1
            if n > best:
                best, hit = n, key
        if hit is not None:
            kv = self.cache[hit]
            self.cache.move_to_end(hit)
            req.kv = [(k[:, :, :best].clone(), v[:, :, :best].clone()) for k, v in kv]
            if self.kv_on_hit is not None:
                req.kv = self.kv_on_hit(req.kv)
            req.kv_len = best
            req.cached_tokens = max(req.cached_tokens, best)
            self.counters["cached_tokens"] += best

    def _plan(self) -> list[tuple[Request, int]]:
        """This step's work: one token per decoding request, prefill chunks within the budget;
        requests retracted (newest first) while the pool cannot hold the step."""
        while True:
            held = sum(len(r.tokens) for r in self.running)  # a prompt's whole KV is reserved at admission
            if held <= self.pool or len(self.running) <= 1:
                break
            victim = self.running.pop()
            victim.kv, victim.kv_len = None, 0
            victim.retracted += 1
            self.counters["retractions"] += 1
            self.waiting.appendleft(victim)
        budget, work = self.chunk, []
        for r in self.running:
            n = self._need(r)
            if n == 1:
                work.append((r, 1))
            elif budget > 0:
                take = min(n, budget)
                budget -= take
                if take < n:
                    self.counters["chunked_prefills"] += 1
                work.append((r, take))
        return work

    def _forward(self, work: list[tuple[Request, int]]) -> None:
        import torch

        eng = self.engine
        with torch.no_grad():
            if eng.deterministic:
                for req, n in work:
                    for _ in range(n):
                        req.logits = self._one(req, req.kv_len)
            else:
                self._batched(work)

    def _one(self, req: Request, pos: int):
        import torch

        dev = self.engine.device
        ids = torch.tensor([[req.tokens[pos]]], device=dev)
        mask = torch.ones(1, pos + 1, dtype=torch.bool, device=dev)
        logits, req.kv = self.engine.model.step(ids, torch.tensor([[pos]], device=dev), mask, req.kv)
        req.kv_len = pos + 1
        return logits[0]

    def _batched(self, work: list[tuple[Request, int]]) -> None:
        """One forward over the step: KV right-aligned to the longest, new tokens right-aligned."""
        import torch

        dev, model = self.engine.device, self.engine.model
        lmax, s = max(r.kv_len for r, _ in work), max(n for _, n in work)
        b = len(work)
        ids = torch.zeros(b, s, dtype=torch.long)
        pos = torch.zeros(b, s, dtype=torch.long)
        mask = torch.zeros(b, lmax + s, dtype=torch.bool)
        layers = model.cfg.num_hidden_layers
        cache = None
        if lmax:
            ref = next(r.kv for r, _ in work if r.kv is not None)
            shape = (b, ref[0][0].shape[1], lmax, ref[0][0].shape[3])
            cache = [(torch.zeros(shape, dtype=ref[0][0].dtype, device=dev),
                      torch.zeros(shape, dtype=ref[0][0].dtype, device=dev)) for _ in range(layers)]
        for i, (r, n) in enumerate(work):
            new = r.tokens[r.kv_len:r.kv_len + n]
            ids[i, s - n:] = torch.tensor(new)
            pos[i, s - n:] = torch.arange(r.kv_len, r.kv_len + n)
            mask[i, lmax - r.kv_len:lmax] = True
            mask[i, lmax + s - n:] = True
            if r.kv_len:
                for layer in range(layers):
                    cache[layer][0][i, :, lmax - r.kv_len:] = r.kv[layer][0][0]
                    cache[layer][1][i, :, lmax - r.kv_len:] = r.kv[layer][1][0]
        logits, out = model.step(ids.to(dev), pos.to(dev), mask.to(dev), cache)
        for i, (r, n) in enumerate(work):
            cols = list(range(lmax - r.kv_len, lmax)) + list(range(lmax + s - n, lmax + s))
            idx = torch.tensor(cols, device=dev)
            r.kv = [(k[i:i + 1].index_select(2, idx), v[i:i + 1].index_select(2, idx)) for k, v in out]
            r.kv_len += n
            r.logits = logits[i]

    def _after(self, work: list[tuple[Request, int]]) -> None:
        import torch

        from pytest_miles.engines.sampling import _sample

        with self.cv:
            self.counters["steps"] += 1
            for req, _ in work:
                if req.kv_len < len(req.tokens):
                    continue  # a prefill chunk: more to come
                try:  # a request the sampler cannot serve fails alone: the loop thread serves the others on
                    logits = req.logits.cpu()
                    tok = _sample(logits, req.params, req.gen)
                    logp = torch.log_softmax(logits.float(), -1)
                    row = None
                    if req.top_logprobs:
                        vals, idx = torch.topk(logp, min(req.top_logprobs, logp.numel()))
                        row = [(int(t), float(v)) for v, t in zip(vals, idx)]
                except Exception as exc:
                    req.error = f"{type(exc).__name__}: {exc}"
                    self._finish(req)
                    continue
                with req.updated:  # a stream reads the three together (reference_server._stream)
                    req.output_ids.append(tok)
                    req.logprobs.append(float(logp[tok]))
                    if row is not None:
                        req.top.append(row)
                    req.updated.notify_all()
                self.counters["generation_tokens"] += 1
                if req.finished:
                    self.running.remove(req)
                    self._store(req)
                    self._finish(req)

    def _store(self, req: Request) -> None:
        if self.prefix_cache and req.kv is not None:
            self.cache[tuple(req.tokens[:req.kv_len])] = req.kv
            while len(self.cache) > self.cache_entries:
                self.cache.popitem(last=False)
        req.kv = None

    def _finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        req.done.set()
        with req.updated:
            req.updated.notify_all()
