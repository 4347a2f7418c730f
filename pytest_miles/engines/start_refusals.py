"""Why an SGLang server refused to start, said in one line above its log's tail: the refusals whose
cause the log alone does not make plain (SGLang names a flag to raise, not what took the memory).

SGLang 0.5.17 sizes its KV pool from two readings of the GPU's free memory, before and after its
weights load (mem_cache/kv_cache_configurator.py `_profile_available_bytes`), and refuses to start when
the second is below `(1 - mem_fraction_static)` of the first: "Loaded weights leave no GPU memory for the
KV cache" (older releases: "Not enough memory. Please try to increase --mem-fraction-static"). With a
tiny model the weights cannot be the cause: other processes on the GPU allocated between the readings.
On an H100 (2026-12-05) that was four servers and the megatron-core ranks started beside it.
"""

from __future__ import annotations

import re

_SECOND_READING = re.compile(r"Loaded weights leave no GPU memory for the KV cache|Not enough memory\. Please try to "
                             r"increase --mem-fraction-static")
_MINIMUM = re.compile(r"minimum viable = 1 - available/pre = ([\d.]+)")
_CUDA_OOM = re.compile(r"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError")


def explain_refusal(log_tail: str, fraction: str | None) -> str:
    """One line saying why a server whose log ends in `log_tail` refused to start, or "" when its log
    shows none of the refusals known here. `fraction`: its --mem-fraction-static (None: SGLang's own)."""
    given = f"--mem-fraction-static {fraction}" if fraction else "SGLang's own --mem-fraction-static"
    if _SECOND_READING.search(log_tail):
        found = _MINIMUM.search(log_tail)
        held = f" (at its second reading {1 - float(found.group(1)):.2f} of the first was still free)" if found else ""
        return (f"why: SGLang reads the GPU's free memory before and after loading the weights, and under {given} "
                f"it needs 1 - that fraction of the first reading still free at the second{held}. Other processes "
                "on this GPU allocated in between: other servers or trainer ranks started beside it, or another "
                "job on the card (nvidia-smi lists them). pytest-miles' own servers started beside each other "
                "use 0.95 (docs/engines.md).")
    if _CUDA_OOM.search(log_tail):
        return ("why: the GPU ran out of memory while the server started; other processes hold it (nvidia-smi lists "
                "them), or its pool and CUDA graphs do not fit beside theirs (--max-total-tokens, "
                "--cuda-graph-max-bs).")
    return ""
