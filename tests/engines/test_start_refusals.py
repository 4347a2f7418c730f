"""A server SGLang refused to start says why, in one line above its log's tail: the memory check that
other processes on the GPU made fail (an H100, 2026-12-05), or a CUDA out-of-memory."""

from __future__ import annotations

import sys

import pytest

from pytest_miles.engines.base import EngineError
from pytest_miles.engines.server import ServerEngine
from pytest_miles.engines.start_refusals import explain_refusal
from pytest_miles.placement.processes import free_port

# The last lines of the refused start's log on the H100 (docs/validation/logs/2026-12-05-h100/
# run3-suite-cold-flashinfer-refused-start.log), SGLang 0.5.17.
REFUSED = (
    "[2026-12-05 16:53:20] Scheduler hit an exception: Traceback (most recent call last):\n"
    "ValueError: Loaded weights leave no GPU memory for the KV cache under --mem-fraction-static=0.75. Raise "
    "--mem-fraction-static above 0.770 (minimum viable = 1 - available/pre = 0.7691). If using speculative "
    "decoding, draft weights are now counted.\n"
    "[2026-12-05 16:53:20] Received sigquit from a child process. It usually means the child failed.\n")


def test_a_refused_start_says_other_processes_took_the_memory_between_the_readings(tmp_path):
    """A stand-in for the refused start (named as such): a process that writes SGLang's lines and kills
    itself with SIGKILL, as SGLang's launcher does when its scheduler fails."""
    code = ("import os, signal, sys; sys.stdout.write(sys.argv[1]); sys.stdout.flush(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    eng = ServerEngine([sys.executable, "-c", code, REFUSED, "--mem-fraction-static", "0.75"], port=free_port(),
                       startup_timeout=30, log_dir=tmp_path)
    with pytest.raises(EngineError) as err:
        eng.start()
    text = str(err.value)
    why = ("why: SGLang reads the GPU's free memory before and after loading the weights, and under "
           "--mem-fraction-static 0.75 it needs 1 - that fraction of the first reading still free at the second "
           "(at its second reading 0.23 of the first was still free). Other processes on this GPU allocated in "
           "between")
    assert "was killed by SIGKILL" in text and why in text, text
    assert text.index("why: ") < text.index("Loaded weights leave no GPU memory"), "the reason comes above the tail"


@pytest.mark.parametrize(("log", "fraction", "words"), [
    (REFUSED, None, "under SGLang's own --mem-fraction-static it needs"),
    ("RuntimeError: Not enough memory. Please try to increase --mem-fraction-static. Current value: "
     "mem_fraction_static=0.3\n", "0.3", "under --mem-fraction-static 0.3 it needs 1 - that fraction of the first "
     "reading still free at the second. Other processes"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", None,
     "why: the GPU ran out of memory while the server started; other processes hold it"),
    ("ImportError: libcuda.so.1: cannot open shared object file\n", "0.75", ""),
    ("", None, ""),
])
def test_explain_refusal(log, fraction, words):
    why = explain_refusal(log, fraction)
    assert (words in why) if words else why == "", why
