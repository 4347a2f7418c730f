"""The in-process `sglang.Engine`, for users who prefer it to a server. Same protocol; close()
shuts the engine down and kills the scheduler/detokenizer processes it started."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pytest_miles.engines.base import (
    EngineError,
    Output,
    SamplingParams,
    WeightNotServed,
    params_json,
    sglang_start_env,
)
from pytest_miles.facts.environment import deterministic_env_vars
from pytest_miles.placement.processes import kill_tree


class SGLangOfflineEngine:
    name = "sglang-offline"

    def __init__(self, model_path: str | Path, *, deterministic: bool = True, attention_backend: str = "flashinfer",
                 mem_fraction_static: float = 0.3, **engine_kwargs: Any) -> None:
        os.environ.update({**sglang_start_env(), **deterministic_env_vars()})  # the scheduler processes inherit it
        import sglang

        skip_tok = not (Path(model_path) / "tokenizer_config.json").exists()
        try:
            self._engine = sglang.Engine(model_path=str(model_path), skip_tokenizer_init=skip_tok,
                                         attention_backend=attention_backend,
                                         enable_deterministic_inference=deterministic,
                                         mem_fraction_static=mem_fraction_static, random_seed=42,
                                         **engine_kwargs)  # CUDA graphs on unless disable_cuda_graph=True
        except Exception as exc:
            self._kill_children()
            raise EngineError(f"sglang.Engine failed to start: {exc}") from exc
        self.deterministic, self.attention_backend = deterministic, attention_backend

    def __enter__(self) -> SGLangOfflineEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Output]:
        res = self._engine.generate(input_ids=prompts, sampling_params=params_json(params, len(prompts)),
                                    return_logprob=True)
        return [Output([int(t[1]) for t in r["meta_info"]["output_token_logprobs"]],
                       [float(t[0]) for t in r["meta_info"]["output_token_logprobs"]],
                       r["meta_info"].get("cached_tokens")) for r in res]

    def generate_one(self, prompt: list[int], params: SamplingParams | None = None, *, top_logprobs: int = 0,
                     stream: bool = False) -> Output:
        """One request through `sglang.Engine.generate` (the offline API surface), with the top-k
        logprob maps when `top_logprobs` > 0; `stream` is accepted for the served engines' signature
        and ignored (the offline call returns the whole answer)."""
        kw = {"top_logprobs_num": int(top_logprobs)} if top_logprobs else {}
        r = self._engine.generate(input_ids=list(prompt), sampling_params=(params or SamplingParams()).to_sglang(),
                                  return_logprob=True, **kw)
        meta = r["meta_info"]
        lps = meta["output_token_logprobs"]
        top = [{int(t[1]): float(t[0]) for t in row} for row in meta.get("output_top_logprobs") or []]
        return Output([int(t[1]) for t in lps], [float(t[0]) for t in lps], meta.get("cached_tokens"), top)

    def server_info(self) -> dict[str, Any]:
        """The engine's effective server_args (after SGLang's own adjustments) and version."""
        import dataclasses

        import sglang

        args = getattr(self._engine, "server_args", None)
        info = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args or {}))
        return {**info, "version": getattr(sglang, "__version__", None)}

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        r = self._engine.generate(input_ids=list(prompt) + list(continuation), return_logprob=True,
                                  logprob_start_len=len(prompt),
                                  sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        vals = [t for t in r["meta_info"]["input_token_logprobs"] if t[0] is not None]
        return [float(t[0]) for t in vals[-len(continuation):]]

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        """`sglang.Engine.update_weights_from_disk`: the RL loop's weight sync."""
        ok, message = self._engine.update_weights_from_disk(str(model_path))[:2]
        if not ok:
            raise EngineError(f"sglang.Engine refused update_weights_from_disk {model_path}: {message}")

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """`sglang.Engine.get_weights_by_name`: SGLang's /get_weights_by_name in process (same
        value; None, SGLang's "failed", raises WeightNotServed). Not bounded by a timeout: the
        call runs on the engine's own event loop."""
        got = self._engine.get_weights_by_name(name, truncate_size)
        if got is None:
            raise WeightNotServed(f"sglang.Engine.get_weights_by_name({name!r}) returned None (\"Get parameter "
                                  "by name failed\": see the scheduler log)")
        return got

    def flush_cache(self) -> None:
        self._engine.flush_cache()

    def _kill_children(self) -> None:
        import psutil

        for child in psutil.Process().children(recursive=False):
            kill_tree(child.pid)

    def close(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            try:
                engine.shutdown()
            finally:
                self._kill_children()
