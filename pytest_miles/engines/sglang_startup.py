"""Where an SGLang server's start-up went, read from its own log: the phases between the lines SGLang
0.5.x writes as it starts (timestamps to the second; CUDA-graph captures with the elapsed time SGLang
measured). The report shows them as stages of the engine's start, so a slow start says whether it was
imports, weights, the KV pool, or kernels compiled during graph capture (FlashInfer JIT), not only that
it was slow.

On an H200 (2026-12-04, docs/validation/logs/2026-12-04e-h200) a tiny-model start spent 31-35 s between
`server_args=` and `Init torch distributed begin` (the scheduler process importing), about 1 s on
weights and the pool, 2-30 s capturing graphs with warm kernels and up to 238 s with FlashInfer's FA3
module compiling under the prefill capture.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[^\]]*\] (.*)$")
_CAPTURE = re.compile(r"Capture (.*?)\s*(?:CUDA|cuda) graph end\. (?:elapsed=|Time elapsed: )([\d.]+) ?s")
# (what the message starts with, the phase that ends there)
_MARKS = (
    ("server_args=", "launcher imports and arguments"),
    ("Init torch distributed begin", "scheduler process imports and CUDA context"),
    ("Load weight begin", "process group and model set-up"),
    ("Load weight end", "weights"),
    ("Memory pool end", "KV pool"),
)
READY = "The server is fired up and ready to roll"


def _wall(stamp: str) -> float:
    """A log timestamp (the host's local time, as Python's logging writes it) as time.time()."""
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def startup_phases(log_text: str, spawned: float, ready: float | None = None) -> list[tuple[str, float]]:
    """[(phase, seconds)] of one start, in order, from the text its log gained since the spawn.
    `spawned` and `ready` (time.time() of the spawn and of the first health answer): the first phase
    starts at the spawn, and what follows the last line read ends at `ready` (warm-up requests are
    not part of it). Phases whose lines are missing (another SGLang version, a failed start) are left
    out; the seconds are never negative."""
    seen: dict[str, float] = {}
    captures: list[tuple[str, float]] = []
    fired = None
    for line in log_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stamp, msg = _wall(m.group(1)), m.group(2)
        for marker, _ in _MARKS:
            if marker not in seen and msg.startswith(marker):
                seen[marker] = stamp
        c = _CAPTURE.search(msg)
        if c:
            kind = c.group(1).replace("target ", "").strip() or "the"
            captures.append((f"{kind} CUDA graphs captured (kernels built at first use included)", float(c.group(2))))
        if fired is None and READY in msg:
            fired = stamp
    out: list[tuple[str, float]] = []
    last = spawned
    for marker, phase in _MARKS:
        if marker in seen:
            out.append((phase, max(0.0, seen[marker] - last)))
            last = seen[marker]
    if "Memory pool end" not in seen:
        return out
    out += captures
    end = fired if fired is not None else ready
    if end is not None:
        rest = max(0.0, end - last - sum(s for _, s in captures))
        out.append(("after the pool until it answers (graphs aside)", rest))
    return out


def read_phases(log_path: Path, offset: int, spawned: float, ready: float | None) -> list[tuple[str, float]]:
    """startup_phases of the log text written from byte `offset` on ([] where the log cannot be read)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return startup_phases(text, spawned, ready)
