"""SGLang's deterministic chunked prefill, checked before a server starts.

In deterministic mode SGLang's scheduler cuts a chunked prefill only at multiples of an alignment
(`Scheduler.init_deterministic_inference_config`, 0.5.17: flashinfer's prefill split tile,
SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE, and triton's SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE,
both 4096 tokens by default). `PrefillAdder.add_one_req` turns a request away while the chunk is
smaller than that alignment, and retries it the same way forever: with --chunked-prefill-size below
the alignment, any prompt longer than the chunk is never scheduled (the server stays healthy, the
request waits). Upstream: sgl-project/sglang#36344, open; the validation is proposed in
sgl-project/sglang#36417. Measured here on an H200 (2026-12-04): 9 requests queued, none running,
for 60 s, with 32-token chunks. From 0.5.22 triton has no alignment (its kernel tiles keys at absolute
positions; `backend_sizes` keeps only flashinfer), read from the released sources 0.5.17-0.5.23."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pytest_miles.errors import InputError

ALIGN_ENV = {"flashinfer": "SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE",
             "triton": "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE"}
DEFAULT_ALIGN = 4096
TRITON_ALIGNED_BEFORE = "0.5.22"
FLAGS = ("--chunked-prefill-size", "--sglang-chunked-prefill-size")


def chunk_size(args: Sequence[str]) -> int | None:
    """The --chunked-prefill-size a command line asks for (the last one wins, as argparse); None without one."""
    from pytest_miles.engines.base import flag_values

    size = None
    for flag, raw in flag_values(args, FLAGS):
        try:
            size = int(raw or "")
        except ValueError:
            raise InputError(f"SGLang argument {flag}: {raw or ''!r} is not an integer (a token count, or -1 "
                             "to turn chunked prefill off)") from None
    return size


def installed_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def alignment(backend: str, env: Mapping[str, str], version: str | None = None) -> int | None:
    """The deterministic prefill alignment of `backend` under `env` in SGLang `version` (None: the
    backend has none; an unknown version is taken to have one)."""
    name = ALIGN_ENV.get(backend)
    if name is None:
        return None
    if backend == "triton" and version is not None:
        from packaging.version import InvalidVersion, Version

        try:
            if Version(version).release >= Version(TRITON_ALIGNED_BEFORE).release:
                return None
        except InvalidVersion:
            pass
    raw = env.get(name)
    if raw is None:
        return DEFAULT_ALIGN
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment {name}={raw!r}: expected an integer number of tokens") from None


def aligned_env(backend: str, chunk: int) -> dict[str, str]:
    """The environment that makes `chunk` a valid deterministic chunk on `backend` (a test that
    wants chunked prefill on a small model: the alignment lowered to the chunk)."""
    name = ALIGN_ENV.get(backend)
    return {name: str(int(chunk))} if name else {}


def check_deterministic_chunking(deterministic: bool, backend: str, args: Sequence[str],
                                 env: Mapping[str, str], version: str | None = "installed") -> None:
    """InputError when a deterministic server would starve every prompt longer than its chunk
    (`version`: SGLang's; "installed" reads the installed one)."""
    size = chunk_size(args)
    if not deterministic or size is None or size <= 0:
        return
    align = alignment(backend, env, installed_version() if version == "installed" else version)
    if align is not None and size < align:
        raise InputError(
            f"SGLang argument --chunked-prefill-size {size} with determinism on and the {backend} backend: "
            f"SGLang's deterministic scheduler cuts prefill chunks only at multiples of {ALIGN_ENV[backend]}="
            f"{align} tokens, so every prompt longer than {size} tokens would wait forever "
            "(sgl-project/sglang#36344). Accepted: --chunked-prefill-size >= "
            f"{align} or -1, or {ALIGN_ENV[backend]} at most {size} in the engine's environment "
            f"(engine_factory(..., env={{'{ALIGN_ENV[backend]}': '{size}'}}))")
