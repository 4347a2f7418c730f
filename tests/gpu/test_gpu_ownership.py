"""On the GPU host: SIGKILL of a pytest holding a real SGLang engine and a megatron run on CUDA
frees the GPU within 15 s (nvidia-smi lists no process of the run). Prints the timeline.

`scripts/gpu-host.sh ownership` runs it (about 2-3 min: SGLang on triton starts in ~75 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.helpers.processes import TAG, describe, tagged

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

INNER = textwrap.dedent('''
    import json, os

    def test_hold_engine_and_training(engine_factory, megatron_trainer_factory, tmp_path):
        eng = engine_factory("sglang", attention_backend="triton", disable_cuda_graph=True)
        ckpt = tmp_path / "ckpt"
        with open(os.environ["MILES_FAULT_READY"], "w") as f:
            json.dump({"port": eng.port, "checkpoints": str(ckpt)}, f)
        megatron_trainer_factory(world_size=1, device="cuda").train(1000000, save_dir=ckpt, save_steps=[1])
''')


def _gpu_apps() -> tuple[set[str], str]:
    """(pids of CUDA processes, memory used) as nvidia-smi reports them."""
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    mem = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip().replace("\n", ", ")
    return set(apps), mem


def test_sigkill_of_pytest_frees_the_gpu_within_15_s(tmp_path):
    pytest.importorskip("sglang")
    pytest.importorskip("megatron.core")
    baseline, mem0 = _gpu_apps()
    tag, ready = uuid.uuid4().hex, tmp_path / "ready.json"
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, TAG: tag, "MILES_FAULT_READY": str(ready)}
    log = tmp_path / "inner.log"
    t0 = time.monotonic()
    timeline = [f"  0.0 s baseline: GPU apps {sorted(baseline)}, memory used {mem0}"]

    def note(text: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f} s {text}")
        print(timeline[-1], flush=True)

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", str(tmp_path / "test_inner.py"),
                                 "-p", "no:cacheprovider", "-p", "no:randomly", "-s", "--rootdir", str(tmp_path)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if ready.exists() and (Path(json.loads(ready.read_text())["checkpoints"]) / "iter_0000001").exists():
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the inner session ended before it was ready:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not ready within 240 s:\n{log.read_text()[-4000:]}"
        apps, mem = _gpu_apps()
        procs = tagged(tag)
        note(f"ready: engine up, megatron training; {len(procs)} processes of the run, GPU apps {sorted(apps)}, "
             f"memory used {mem}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        note("SIGKILL to pytest; pytest gone")
        t_kill = time.monotonic()
        while True:
            left, (apps, mem) = tagged(tag), _gpu_apps()
            extra = apps - baseline
            if (not left and not extra) or time.monotonic() - t_kill > 15:
                break
            time.sleep(0.5)
        note(f"{len(left)} processes of the run left, GPU apps beyond the baseline {sorted(extra)}, "
             f"memory used {mem}")
        print("\n".join(["timeline:", *timeline]))
        assert not left and not extra, f"15 s after SIGKILL: processes {describe(left)}, GPU apps {sorted(extra)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tagged(tag):
            try:
                p.kill()
            except psutil.Error:
                pass
