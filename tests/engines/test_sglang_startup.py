"""Where an SGLang start went, read from its log: the phases of a real start (lines of SGLang 0.5.17 on an
H200, 2026-12-04: docs/validation/logs/2026-12-04e-h200/cold-engine-sglang-37377.log, the determinism-off
server of a cold run, its prefill capture waiting for FlashInfer's FA3 module)."""

from __future__ import annotations

import pytest

from pytest_miles.engines.sglang_startup import _wall, read_phases, startup_phases

COLD_FLAG_OFF = """\
/tmp/miles-gpu/site/sglang/launch_server.py:56: UserWarning: 'python -m sglang.launch_server' is still supported
[2026-12-04 19:35:03] skip_tokenizer_init=True: string-based stop conditions (stop, stop_regex) are unavailable.
[2026-12-04 19:35:06] server_args=ServerArgs(model_path='/tmp/pytest-of-root/pytest-0/miles-model-tiny', dtype='auto')
[2026-12-04 19:35:40] Init torch distributed begin.
[2026-12-04 19:35:41] Init torch distributed ends. elapsed=0.07 s, mem usage=0.09 GB
[2026-12-04 19:35:44] Load weight begin. avail mem=134.26 GB
[2026-12-04 19:35:45] Load weight end. elapsed=0.14 s, type=Qwen2ForCausalLM, avail mem=134.03 GB, mem usage=0.23 GB.
[2026-12-04 19:35:45] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 30707988, K size: 7.32 GB, V size: 7.32 GB
[2026-12-04 19:35:45] Memory pool end. avail mem=118.98 GB
[2026-12-04 19:35:45] Capture target prefill CUDA graph begin. backend=breakable, num_tokens=[4, 8, 12]
[2026-12-04 19:39:43] Capture target prefill CUDA graph end. elapsed=238.11 s, mem usage=26.25 GB, avail mem=90.75 GB.
[2026-12-04 19:39:43] Capture target decode CUDA graph begin. backend=full, num_tokens_per_req=1, bs=[1, 2, 4]
[2026-12-04 19:39:45] Capture target decode CUDA graph end. elapsed=1.93 s, mem usage=0.42 GB, avail mem=90.31 GB.
[2026-12-04 19:39:45] max_total_num_tokens=30707988, chunked_prefill_size=8192, max_prefill_tokens=16384
[2026-12-04 19:39:46] The server is fired up and ready to roll!
"""


def test_the_phases_of_a_real_cold_start():
    spawned = _wall("2026-12-04 19:34:50")
    phases = dict(startup_phases(COLD_FLAG_OFF, spawned, _wall("2026-12-04 19:39:47")))
    assert list(phases) == [
        "launcher imports and arguments", "scheduler process imports and CUDA context",
        "process group and model set-up", "weights", "KV pool",
        "prefill CUDA graphs captured (kernels built at first use included)",
        "decode CUDA graphs captured (kernels built at first use included)",
        "after the pool until it answers (graphs aside)"]
    assert phases["launcher imports and arguments"] == 16
    assert phases["scheduler process imports and CUDA context"] == 34
    assert phases["process group and model set-up"] == 4 and phases["weights"] == 1 and phases["KV pool"] == 0
    assert phases["prefill CUDA graphs captured (kernels built at first use included)"] == 238.11
    assert phases["decode CUDA graphs captured (kernels built at first use included)"] == 1.93
    # 19:35:45 -> 19:39:46 is 241 s, 240.04 of it in the two captures (to the second: never negative)
    assert phases["after the pool until it answers (graphs aside)"] == pytest.approx(0.96)
    # the whole start, to the second
    assert sum(phases.values()) == pytest.approx(_wall("2026-12-04 19:39:46") - spawned)


def test_older_lines_a_failed_start_and_text_that_is_no_log():
    older = ("[2025-06-01 10:00:05 TP0] Init torch distributed begin.\n"
             "[2025-06-01 10:00:07 TP0] Load weight begin. avail mem=70 GB\n"
             "[2025-06-01 10:00:09 TP0] Load weight end. type=LlamaForCausalLM\n"
             "[2025-06-01 10:00:10 TP0] Memory pool end. avail mem=20 GB\n"
             "[2025-06-01 10:00:22 TP0] Capture cuda graph end. Time elapsed: 11.50 s. mem usage=0.3 GB\n")
    phases = startup_phases(older, _wall("2025-06-01 10:00:00"), _wall("2025-06-01 10:00:24"))
    assert phases[0] == ("scheduler process imports and CUDA context", 5)  # no server_args line: from the spawn
    assert ("the CUDA graphs captured (kernels built at first use included)", 11.5) in phases
    assert phases[-1] == ("after the pool until it answers (graphs aside)", 2.5)  # up to the first answer
    failed = COLD_FLAG_OFF.split("[2026-12-04 19:35:44]")[0]  # died before its weights loaded
    assert [p for p, _ in startup_phases(failed, _wall("2026-12-04 19:35:00"))] == [
        "launcher imports and arguments", "scheduler process imports and CUDA context"]
    assert startup_phases("Traceback (most recent call last):\nImportError: no sglang\n", 0.0, 1.0) == []


def test_only_the_text_of_this_start_is_read(tmp_path):
    log = tmp_path / "sglang-30000.log"
    earlier = COLD_FLAG_OFF.replace("2026-12-04 19:", "2026-12-03 08:")
    log.write_text(earlier + COLD_FLAG_OFF)
    phases = dict(read_phases(log, len(earlier.encode()), _wall("2026-12-04 19:34:50"), None))
    assert phases["launcher imports and arguments"] == 16 and "after the pool until it answers (graphs aside)" in phases
    assert read_phases(tmp_path / "missing.log", 0, 0.0, None) == []
