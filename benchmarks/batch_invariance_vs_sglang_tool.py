"""Wall time of `assert_batch_invariant(mode="single", trials=50)` (every item's ids AND
logprobs, bitwise) against SGLang's own `python -m sglang.test.test_deterministic --test-mode
single --n-trials 50` (first item's text only), on the same engine in one run.

    python benchmarks/batch_invariance_vs_sglang_tool.py            # GPU host: real SGLang
    python benchmarks/batch_invariance_vs_sglang_tool.py --cpu      # the embedded engine on CPU

Same prompt ("Tell me about Richard Feynman: "), greedy, the tool's 3 warm-up batches of 16 for
both. On CPU there is no SGLang: the tool's single-mode client loop is replayed over input_ids
against the reference server (SGLang's HTTP API) and fewer new tokens are generated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "Tell me about Richard Feynman: "


def encode(text: str) -> list[int]:
    return [ord(c) - 32 + 3 for c in text]  # the tiny model's character tokenizer


def tool_loop_over_ids(url: str, ids: list[int], trials: int, max_new_tokens: int) -> int:
    """SGLang's test_deterministic single mode, replayed over input_ids: first item only."""
    def send(bs: int):
        body = json.dumps({"input_ids": [ids] * bs, "sampling_params": {
            "temperature": 0.0, "max_new_tokens": max_new_tokens, "sampling_seed": 42}}).encode()
        req = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())[0]["output_ids"]
    for _ in range(3):
        send(16)
    return len({tuple(send(bs)) for bs in range(1, trials + 1)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--backend", default="flashinfer")
    args = ap.parse_args()
    from pytest_miles.checks.batch_invariance import assert_batch_invariant
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.engines.reference_server_engine import ReferenceServerEngine
    from pytest_miles.engines.server import SGLangEngine
    from pytest_miles.models.embedded import write_hf_checkpoint

    model = write_hf_checkpoint(Path(tempfile.mkdtemp()) / "tiny", tokenizer=True)
    new_tokens = 16 if args.cpu else 100
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    if args.cpu:
        eng = ReferenceServerEngine(model, deterministic=True).start()
    else:
        eng = SGLangEngine(model, attention_backend=args.backend, skip_tokenizer_init=False).start()
    try:
        print(f"engine {eng.name} healthy after {eng.startup_seconds:.1f} s; trials {args.trials}, "
              f"{new_tokens} new tokens, greedy")
        t0 = time.perf_counter()
        if args.cpu:
            unique = tool_loop_over_ids(eng.url, encode(PROMPT), args.trials, new_tokens)
            tool_label = "sglang tool's single loop over input_ids (first item's ids only)"
        else:
            out = subprocess.run([sys.executable, "-m", "sglang.test.test_deterministic", "--host", "127.0.0.1",
                                  "--port", str(eng.port), "--test-mode", "single", "--n-trials", str(args.trials)],
                                 capture_output=True, text=True, timeout=1200)
            if out.returncode != 0:
                sys.exit(f"sglang tool failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            unique = [ln for ln in out.stdout.splitlines() if "Unique samples" in ln][-1]
            tool_label = "python -m sglang.test.test_deterministic --test-mode single (first item's text only)"
        t_tool = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(3):
            eng.generate([encode(PROMPT)] * 16, params)
        report = assert_batch_invariant(eng, "single", args.trials, params=params, prompt=encode(PROMPT),
                                        batch_sizes=list(range(1, args.trials + 1)))  # the tool's sizes
        t_ours = time.perf_counter() - t0
    finally:
        eng.close()
    print(f"  {tool_label:88} {t_tool:7.2f} s   ({unique})")
    print(f"  {'assert_batch_invariant(single, every item ids + logprobs bitwise)':88} {t_ours:7.2f} s   "
          f"({report.samples} samples, unique {report.unique})")
    print(f"  ratio ours / tool: {t_ours / t_tool:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
