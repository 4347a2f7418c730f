"""The Engine protocol: token ids in; per item, output ids and per-token logprobs out.

Engines are context managers; `close()` always frees the process tree and device memory.
Engines never judge anything: the checks in `pytest_miles.checks` do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from pytest_miles.errors import EngineError, WeightNotServed  # noqa: F401  (importable here too)

# SGLang start-up settings whose default we change (the user's own value, if set, wins). They pick
# when kernels are compiled, not which kernels run: the served numbers are the same.
SGLANG_START_ENV: dict[str, tuple[str, str]] = {
    "SGLANG_JIT_DEEPGEMM_PRECOMPILE": (
        "0", "DeepGEMM's start-up precompile of every M from 1 to 16384 per FP8 GEMM shape takes 10-20 min on a "
        "fresh host (sgl-project/sglang#5580, #4773); off, the same kernels compile when a shape is first used "
        "(CUDA graph capture's warm-up runs before capture)"),
}


def sglang_start_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """SGLANG_START_ENV's values, less those `environ` (default os.environ) already sets."""
    import os

    environ = os.environ if environ is None else environ
    return {k: v for k, (v, _) in SGLANG_START_ENV.items() if k not in environ}


def flag_values(args: tuple[str, ...] | list[str], flags: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(flag, raw value) for every one of `flags` in a command line, in order, as argparse reads them:
    `--flag x` or `--flag=x`; None for a flag that ends the line with no value after it."""
    args = list(args)
    out: list[tuple[str, str | None]] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in flags:
            out.append((flag, value if eq else (args[i + 1] if i + 1 < len(args) else None)))
    return out


def sglang_arg(args: tuple[str, ...] | list[str], name: str) -> str | None:
    """The value of SGLang's `--name x` / `--name=x` in these arguments (Miles' `--sglang-name` too),
    the last one winning, as SGLang's parser reads it; None when absent."""
    values = [v for _, v in flag_values(args, (f"--{name}", f"--sglang-{name}")) if v is not None]
    return values[-1] if values else None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    sampling_seed: int | None = 42
    min_p: float = 0.0  # SGLang's: drop tokens below min_p x the top token's probability
    ignore_eos: bool = False  # SGLang's: generate max_new_tokens even past EOS (the embedded engines always do)

    def __post_init__(self) -> None:
        import math
        import numbers

        from pytest_miles.errors import InputError

        def number(name: str, integer: bool = False) -> Any:
            """The field as a plain int or float (numpy's scalars too: they are JSON for SGLang after this)."""
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real) or (
                    not integer and not math.isfinite(value)):
                raise InputError(f"SamplingParams.{name}: expected {'an integer' if integer else 'a finite number'}, "
                                 f"got {value!r:.60}")
            try:  # a float field is a float: 2**70 as an int overflows a kernel's scalar
                value = int(value) if integer else float(value)
            except OverflowError:
                raise InputError(f"SamplingParams.{name}: expected a finite number, got {value!r:.60}") from None
            object.__setattr__(self, name, value)
            return value

        if number("temperature") < 0:
            raise InputError(f"SamplingParams.temperature: {self.temperature} < 0")
        if not 0 < number("top_p") <= 1:
            raise InputError(f"SamplingParams.top_p: {self.top_p} not in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            raise InputError(f"SamplingParams.min_p: {self.min_p} not in [0, 1]")
        if number("top_k", integer=True) < -1 or self.top_k == 0:
            raise InputError(f"SamplingParams.top_k: {self.top_k}: expected -1 (off) or an integer >= 1")
        if not 1 <= number("max_new_tokens", integer=True) <= 2**31 - 1:
            raise InputError(f"SamplingParams.max_new_tokens: {self.max_new_tokens} not in [1, 2**31 - 1]")
        if self.sampling_seed is not None and not -(2**63) <= number("sampling_seed", integer=True) < 2**63:
            raise InputError(f"SamplingParams.sampling_seed: {self.sampling_seed} is not a 64-bit integer (or None)")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"SamplingParams.ignore_eos: expected True or False, got {self.ignore_eos!r:.60}")

    def to_sglang(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return d


def per_item(params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the RL loop gives every sample its own sampling_seed (one
    seed for n copies of a prompt would give n identical samples)."""
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling params: {len(params)} given for {n} prompts (one, or one per prompt)")
    if len({p.max_new_tokens for p in params}) > 1:
        raise ValueError("sampling params: max_new_tokens must be the same for every prompt of one batch")
    return params


def params_json(params: SamplingParams | list[SamplingParams] | None, n: int) -> dict[str, Any] | list[dict[str, Any]]:
    """SGLang's sampling_params: one dict, or a list of one per prompt."""
    if params is None or isinstance(params, SamplingParams):
        return (params or SamplingParams()).to_sglang()
    return [p.to_sglang() for p in per_item(params, n)]


@dataclass
class Output:
    output_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (SGLang meta_info), if told
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # per position: token id -> logprob
    retractions: int | None = None  # times the engine retracted this request (SGLang meta_info.num_retractions)


@runtime_checkable
class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Output]:
        """One batch: every prompt is scheduled together, as a real engine would batch them.
        `params`: one for all, or one per prompt."""

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """Logprobs of `continuation` given `prompt`, from one prefill (for p_vs_d)."""

    def flush_cache(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...


def stream_merge(acc: dict | None, chunk: dict) -> dict:
    """Cumulative chunks (each extends the last) replace it; incremental ones are appended."""
    if acc is None:
        return chunk
    a, c = acc.get("output_ids") or [], chunk.get("output_ids") or []
    if len(c) > len(a) and c[:len(a)] == a:
        return chunk
    meta, cm = dict(acc["meta_info"]), chunk.get("meta_info", {})
    for key in ("output_token_logprobs", "output_top_logprobs"):
        if key in cm:
            meta[key] = list(meta.get(key) or []) + list(cm[key])
    for key in ("cached_tokens", "num_retractions"):
        meta[key] = cm.get(key, meta.get(key))
    return {**chunk, "output_ids": a + c, "meta_info": meta}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text (SGLang's /metrics): name -> value, labels dropped (values of one name summed). A sample
    line is `name{labels} value [timestamp]`; label values may hold spaces and braces inside their quotes."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line.split(" ", 1)[0]:
            name, rest = line.split("{", 1)[0], line[line.rfind("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        try:
            out[name] = out.get(name, 0.0) + float(fields[0])
        except (ValueError, IndexError):
            continue
    return out
