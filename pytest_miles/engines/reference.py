"""The embedded default engine: the tiny seeded decoder in plain torch, batched like a real
engine (left padding, one forward over the whole batch per step).

`deterministic=False` (default) is an ordinary batched engine with a KV cache: a batched
prefill, then decode steps whose matmuls have one row per batch item. BLAS picks its kernel by
the row count (a matrix-vector kernel at batch size 1, a blocked GEMM above), so logprobs
change in their last bits with batch size, as on GPUs. `deterministic=True` feeds each item
one token at a time (every matmul has exactly one row, prefill included), so an item's bits
cannot depend on what else is in the batch, and prefill logprobs equal decode logprobs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pytest_miles.engines.base import EngineError, Output, SamplingParams, WeightNotServed, per_item
from pytest_miles.engines.sampling import _sample
from pytest_miles.models.embedded import TinyConfig, load_safetensors_dir
from pytest_miles.models.moe import MoeConfig
from pytest_miles.models.routing import RoutingRecord, record_from_layers
from pytest_miles.models.shapes import check_weights, config_of_dir, decoder_class, init_any_weights


def _load_state(model_dir: Path):
    if not any(Path(model_dir).glob("*.safetensors")):
        raise EngineError(f"{model_dir}: no .safetensors weights")
    return load_safetensors_dir(model_dir)


def deterministic_switch(deterministic: bool, batch_invariant: bool | None, who: str) -> bool:
    """One switch, one name: `deterministic=`, as engine_factory and SGLang call it. The earlier
    `batch_invariant=` still works, with a DeprecationWarning."""
    if batch_invariant is None:
        return deterministic
    import warnings

    warnings.warn(f"{who}(batch_invariant=) is deprecated: use deterministic=", DeprecationWarning, stacklevel=3)
    return batch_invariant


class ReferenceEngine:
    name = "reference"
    has_prefix_cache = False

    @property
    def batch_invariant(self) -> bool:
        """The earlier name of `deterministic` (read-only)."""
        return self.deterministic

    def __init__(self, model_dir: str | Path | None = None, *, config: TinyConfig | MoeConfig | None = None,
                 deterministic: bool = False, device: str = "cpu", dtype: str = "float32",
                 batch_invariant: bool | None = None) -> None:
        import torch

        deterministic = deterministic_switch(deterministic, batch_invariant, type(self).__name__)
        if model_dir is not None:
            cfg = config_of_dir(model_dir)
            state = _load_state(Path(model_dir))
            check_weights(cfg, state, model_dir)
        else:
            cfg = config or TinyConfig()
            state = init_any_weights(cfg)
        self.config = cfg
        self.deterministic = deterministic
        self.device = device
        self.model = decoder_class(cfg)(cfg, state, device=device, dtype=getattr(torch, dtype))
        self.closed = False
        self.launches = 1

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        """Reload the weights in place (the in-process equivalent of SGLang's
        /update_weights_from_disk): same shapes required, the sampling state untouched."""
        import torch

        if self.closed:
            raise EngineError("reference engine is closed")
        cfg = config_of_dir(model_path)
        if replace(cfg, seed=self.config.seed) != self.config:
            raise EngineError(f"{model_path}: config.json describes another model than the one loaded "
                              f"({cfg} vs {self.config})")
        state = _load_state(Path(model_path))
        check_weights(self.config, state, model_path)
        self.model = decoder_class(self.config)(self.config, state, device=self.device,
                                 dtype=self.model.dtype if self.model is not None else torch.float32)

    def weights_by_name(self, name: str, truncate_size: int = 100) -> list | None:
        """SGLang's get_weights_by_name answer from the weights this engine computes with (held in
        its dtype, float32 by default), None where SGLang answers "failed"."""
        from pytest_miles.models.weights_by_name import weights_by_name

        if self.closed:
            raise EngineError("reference engine is closed")
        return weights_by_name(self.model.w, name, truncate_size, tied=self.config.tie_word_embeddings)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """The offline equivalent of SGLang's /get_weights_by_name (`sglang.Engine.get_weights_by_name`):
        the first `truncate_size` rows as float32 lists; WeightNotServed where SGLang returns None."""
        got = self.weights_by_name(name, truncate_size)
        if got is None:
            raise WeightNotServed(f"{self.name}: get_weights_by_name({name!r}) answered None (SGLang's "
                                  f"\"Get parameter by name failed\"): the model has no parameter of that name")
        return got

    def routing(self, tokens: list[int], router_hooks: tuple = ()) -> RoutingRecord:
        """The experts each of `tokens` goes to in each MoE layer, from one prefill over them (token
        by token in deterministic mode), with the router's probabilities. `router_hooks`: see
        MoeDecoder (an experiment that nudges a router's logits). A dense model is an EngineError."""
        import torch

        if not isinstance(self.config, MoeConfig):
            raise EngineError("routing: the loaded model is dense (no router); load a mixture-of-experts "
                              "shape (tiny-moe, qwen3-30b-a3b-2l)")
        self._check([list(tokens)])
        picked: dict[int, list] = {}
        probs: dict[int, list] = {}

        def sink(layer, positions, p, experts):
            picked.setdefault(layer, []).append(experts.reshape(-1, experts.shape[-1]).cpu())
            probs.setdefault(layer, []).append(p.reshape(-1, p.shape[-1]).cpu())

        self.model.routing_sink, self.model.router_hooks = sink, list(router_hooks)
        try:
            with torch.no_grad():
                if self.deterministic:
                    self._incremental(list(tokens))
                else:
                    ids, pos, mask = self._left_pad([list(tokens)])
                    self.model.step(ids, pos, mask, all_logits=True)
        finally:
            self.model.routing_sink, self.model.router_hooks = None, []
        layers = sorted(picked)
        return record_from_layers(f"{self.name} engine", [torch.cat(picked[n]) for n in layers],
                                  [torch.cat(probs[n]) for n in layers], tokens=tokens)

    # -- protocol --------------------------------------------------------------------------

    def __enter__(self) -> ReferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.model = None  # frees the weights (and device memory)

    def flush_cache(self) -> None:
        """No prefix cache: every request is computed from scratch."""

    def server_info(self) -> dict:
        """The same keys SGLang's /get_server_info answers, so witnesses read every engine alike."""
        from pytest_miles import __version__

        return {"attention_backend": "torch-reference", "enable_deterministic_inference": self.deterministic,
                "disable_radix_cache": True, "disable_cuda_graph": True, "chunked_prefill_size": None,
                "sampling_backend": "torch", "version": __version__,
                "note": "the embedded reference engine has no prefix cache"}

    def _check(self, prompts: list[list[int]]) -> None:
        if self.closed:
            raise EngineError("reference engine is closed")
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompts: expected a non-empty list of non-empty token-id lists")
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if isinstance(t, bool) or not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise ValueError(f"prompts[{i}]: token id {bad[0]!r} outside the vocabulary [0, {vocab})")

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Output]:
        self._check(prompts)
        items = per_item(params, len(prompts))
        limit = self.config.max_position_embeddings
        if max(len(p) for p in prompts) + items[0].max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens exceeds the model's {limit} positions")
        if self.deterministic:
            return [self._run([p], [sp])[0] for p, sp in zip(prompts, items)]
        return self._run(prompts, items)

    def generate_one(self, prompt: list[int], params: SamplingParams | None = None, *, top_logprobs: int = 0,
                     stream: bool = False) -> Output:
        """One request in process, through the same scheduler the reference server runs (the
        in-process counterpart of the offline `sglang.Engine`), with the top-k logprob maps when
        `top_logprobs` > 0; `stream` is accepted for the served engines' signature."""
        from pytest_miles.engines.scheduler import Scheduler

        self._check([list(prompt)])
        params = params or SamplingParams()
        if len(prompt) + params.max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens exceeds the model's {self.config.max_position_embeddings} "
                             "positions")
        if getattr(self, "_scheduler", None) is None:
            self._scheduler = Scheduler(self)
        req = self._scheduler.submit(list(prompt), params, int(top_logprobs))
        req.done.wait()
        if req.error:
            raise EngineError(f"{self.name}: {req.error}")
        return Output(list(req.output_ids), list(req.logprobs), req.cached_tokens,
                      [dict(row) for row in req.top])

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """Logprobs of `continuation` from one prefill of prompt + continuation."""
        import torch

        self._check([list(prompt) + list(continuation)])
        seq = list(prompt) + list(continuation)
        with torch.no_grad():
            if self.deterministic:
                rows = self._incremental(seq)
            else:
                ids, pos, mask = self._left_pad([seq])
                rows = self.model.step(ids, pos, mask, all_logits=True)[0][0]
        logp = torch.log_softmax(rows.float().cpu(), dim=-1)
        start = len(prompt)
        return [float(logp[start - 1 + j, tok]) for j, tok in enumerate(continuation)]

    def hidden_states(self, tokens: list[int]) -> dict:
        """Per layer point (embedding, layers.N.{input_norm, attention, post_attention_norm, mlp,
        output}, final_norm, logits) the [tokens, hidden] tensor of one prefill of `tokens`: the
        engine side of the divergence locator (checks.locate), in the names it compares by."""
        import torch

        self._check([list(tokens)])
        got: dict = {}
        self.model.trace = lambda name, value: got.__setitem__(name, value[0].detach().cpu().clone())
        try:
            with torch.no_grad():
                ids, pos, mask = self._left_pad([list(tokens)])
                logits = self.model.step(ids, pos, mask, all_logits=True)[0]
        finally:
            self.model.trace = None
        got["logits"] = logits[0].cpu()
        return got

    # -- internals -------------------------------------------------------------------------

    def _left_pad(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = True
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), pos.to(self.device), mask.to(self.device)

    def _incremental(self, seq: list[int], cache=None, start: int = 0):
        """Feed one token at a time (every matmul has one row): what makes the invariant mode
        invariant, and prefill equal to decode. Returns the logits of every fed position."""
        import torch

        rows = []
        for i, tok in enumerate(seq):
            p = start + i
            ids = torch.tensor([[tok]], device=self.device)
            pos = torch.tensor([[p]], device=self.device)
            mask = torch.ones(1, p + 1, dtype=torch.bool, device=self.device)
            logits, cache = self.model.step(ids, pos, mask, cache)
            rows.append(logits[0])
        self._cache = cache
        return torch.stack(rows)

    def _run(self, prompts: list[list[int]], items: list[SamplingParams]) -> list[Output]:
        import torch

        outs = [Output([], [], cached_tokens=0) for _ in prompts]
        gens = []
        for sp in items:
            g = torch.Generator(device="cpu")
            g.manual_seed(sp.sampling_seed if sp.sampling_seed is not None else 0)
            gens.append(g)
        params = items[0]  # max_new_tokens is shared (per_item checks it)
        with torch.no_grad():
            if self.deterministic:  # one item, one row at a time
                (prompt,) = prompts
                logits = self._incremental(prompt)[-1:].cpu()
                for step in range(params.max_new_tokens):
                    tok = _sample(logits[0], items[0], gens[0])
                    outs[0].output_ids.append(tok)
                    outs[0].logprobs.append(float(torch.log_softmax(logits[0].float(), -1)[tok]))
                    if step + 1 < params.max_new_tokens:
                        logits = self._incremental([tok], self._cache, len(prompt) + step)[-1:].cpu()
                return outs
            ids, pos, mask = self._left_pad(prompts)  # batched prefill, then batched decode
            logits, cache = self.model.step(ids, pos, mask)
            for step in range(params.max_new_tokens):
                logits = logits.cpu()
                logp = torch.log_softmax(logits.float(), dim=-1)
                toks = []
                for i in range(len(prompts)):
                    tok = _sample(logits[i], items[i], gens[i])
                    toks.append(tok)
                    outs[i].output_ids.append(tok)
                    outs[i].logprobs.append(float(logp[i, tok]))
                if step + 1 == params.max_new_tokens:
                    break
                pos = pos[:, -1:] + 1
                mask = torch.cat((mask, torch.ones(len(prompts), 1, dtype=torch.bool, device=self.device)), 1)
                ids = torch.tensor(toks, device=self.device)[:, None]
                logits, cache = self.model.step(ids, pos, mask, cache)
        return outs
