"""Fault injection: pytest killed at different points must leave no process and no listening port.

Real sessions (reference-server engines, megatron-core ranks training on gloo, a local Ray head,
pytest-xdist workers) are killed with SIGKILL, SIGTERM and SIGHUP, or ended by pytest-timeout's
thread and signal methods. Every process of a session carries a tag in its environment (inherited
by whatever it starts), so psutil finds every survivor, whoever its parent is now. Scenarios of one
test run in parallel (each is mostly waiting), so the module costs one session's startup, twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.helpers.processes import TAG, describe, listening, still_held, tagged

pytestmark = pytest.mark.timeout(240)

INNER = textwrap.dedent('''
    import json, os, time
    import pytest

    def ready(name, **info):
        path = os.path.join(os.environ["MILES_FAULT_READY"], name)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)

    @pytest.fixture
    def eng(engine_factory):  # started in setup: pytest-timeout (timeout_func_only) times the test only
        return engine_factory("reference-server")

    def test_engine(eng):
        ready("engine", port=eng.port)
        time.sleep(600)

    def test_engine_and_ray(ray_cluster, eng):
        ready("engine", port=eng.port)
        time.sleep(600)

    def test_engine_ray_and_training(ray_cluster, eng, megatron_trainer_factory, tmp_path):
        ready("engine", port=eng.port, checkpoints=str(tmp_path / "ckpt"))
        trainer = megatron_trainer_factory(world_size=2, timeout=600.0)
        trainer.train(100000, save_dir=tmp_path / "ckpt", save_steps=[1])

    @pytest.mark.parametrize("i", range(2))
    def test_engine_per_worker(eng, i):
        ready(os.environ.get("PYTEST_XDIST_WORKER", "main"), port=eng.port)
        time.sleep(600)
''')

# The inner session starts as from a terminal, whatever this runner ignores (under `nohup`, SIGHUP
# is ignored and children inherit that: the plugin rightly leaves an ignored signal ignored, so the
# SIGHUP scenario would test nothing). The dispositions are reset, then pytest is exec'd (same pid).
DEFAULT_SIGNALS = ("import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                   "signal.signal(signal.SIGTERM, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])")

SUMMARY = re.compile(r"^=+ .*\bin [\d.]+s.* =+$", re.M)


@dataclass
class Scenario:
    name: str
    test: str
    args: tuple[str, ...] = ()
    sig: int | None = None  # sent once the session is ready; None: pytest-timeout ends it
    ready: tuple[str, ...] = ("engine",)  # files the inner tests write when their processes are up
    training: bool = False  # also wait for the ranks to finish step 1
    summary: bool = False  # pytest must still print its summary
    result: dict = field(default_factory=dict)


def _run(sc: Scenario, root: Path) -> Scenario:
    """Start the session, wait until its processes are up, kill it, then poll (up to 10 s) for
    survivors. Every step is bounded; the timeline goes into the result."""
    tag, ready_dir = uuid.uuid4().hex, root / f"ready-{sc.name}"
    ready_dir.mkdir()
    env = {**os.environ, TAG: tag, "MILES_FAULT_READY": str(ready_dir), "PYTHONUNBUFFERED": "1",
           "PYTEST_MILES_RAY_TIMEOUT": "120"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_TESTRUNUID", None)
    log = root / f"{sc.name}.log"
    t0 = time.monotonic()
    timeline = []
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DEFAULT_SIGNALS, sys.executable, "-m", "pytest",
             f"{root / 'test_inner.py'}::{sc.test}", "-p", "no:cacheprovider",
             "-p", "no:randomly", "-p", "no:hypothesispytest", "-p", "no:benchmark", "--rootdir", str(root), f"--basetemp={root / ('bt-' + sc.name)}", *sc.args],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ports: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            files = [ready_dir / r for r in sc.ready]
            if all(f.exists() for f in files):
                info = [json.loads(f.read_text()) for f in files]
                if not sc.training or Path(info[0]["checkpoints"], "iter_0000001").exists():
                    break
            time.sleep(0.2)
        else:
            if proc.poll() is None:
                raise AssertionError(f"{sc.name}: the session was not ready within 150 s; log:\n{log.read_text()[-3000:]}")
        if proc.poll() is not None:
            raise AssertionError(f"{sc.name}: the session ended (exit {proc.returncode}) before its processes were up; "
                                 f"log:\n{log.read_text()[-3000:]}")
        timeline.append(f"{time.monotonic() - t0:6.1f} s ready")
        procs = tagged(tag)
        ours = {p.pid for p in procs}
        ports = listening(ours)
        sc.result["before"] = len(procs)
        if sc.sig is not None:
            os.kill(proc.pid, sc.sig)
            timeline.append(f"{time.monotonic() - t0:6.1f} s {signal.Signals(sc.sig).name} to pytest "
                            f"({len(procs)} processes, ports {sorted(ports)})")
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            timeline.append(f"{time.monotonic() - t0:6.1f} s pytest still running 90 s later: SIGKILL")
            proc.kill()
            proc.wait()
        t_exit = time.monotonic()
        timeline.append(f"{t_exit - t0:6.1f} s pytest exited with code {proc.returncode}")
        left = tagged(tag)
        while left and time.monotonic() - t_exit < 10:
            time.sleep(0.2)
            left = tagged(tag)
        timeline.append(f"{time.monotonic() - t0:6.1f} s {len(left)} processes left")
        held, reused = still_held(ports, ours, tag)
        if reused:
            timeline.append(f"{time.monotonic() - t0:6.1f} s ports let go and since taken by others: {reused}")
        sc.result.update(left=describe(left), ports=held, code=proc.returncode,
                         output=log.read_text(errors="replace"), timeline=timeline)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tagged(tag):  # never leave anything to the next test, even when this one fails
            try:
                p.kill()
            except psutil.Error:
                pass
    return sc


def _run_all(scenarios: list[Scenario], root: Path) -> None:
    (root / "test_inner.py").write_text(INNER)
    with ThreadPoolExecutor(len(scenarios)) as pool:
        done = list(pool.map(lambda sc: _run(sc, root), scenarios))
    problems = []
    for sc in done:
        r = sc.result
        print(f"--- {sc.name}\n" + "\n".join(r["timeline"]))
        if r["left"] or r["ports"]:
            problems.append(f"{sc.name}: {len(r['left'])} processes and ports {r['ports']} left 10 s after pytest "
                            f"ended: {r['left']}")
        if sc.summary and (not SUMMARY.search(r["output"]) or r["code"] != 2):
            problems.append(f"{sc.name}: no summary, or exit code {r['code']} instead of 2 (interrupted); output "
                            f"tail:\n{r['output'][-2500:]}")
        if r["before"] < 2:
            problems.append(f"{sc.name}: only {r['before']} processes were up at the kill: the scenario tested "
                            f"nothing; output tail:\n{r['output'][-2500:]}")
    assert not problems, "\n\n".join(problems)


def _need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m)


def test_signals_leave_no_process_and_no_port(tmp_path):
    """SIGKILL mid-training (engine, Ray head, two megatron ranks) and SIGTERM with Ray up (Ray's
    handler must not turn it into SIGABRT; pytest still prints its summary): nothing survives."""
    _need("ray", "megatron.core")
    _run_all([
        Scenario("sigkill-training", "test_engine_ray_and_training", sig=signal.SIGKILL, training=True),
        Scenario("sigterm-ray", "test_engine_and_ray", sig=signal.SIGTERM, summary=True),
    ], tmp_path)


def test_timeouts_and_xdist_leave_no_process_and_no_port(tmp_path):
    """pytest-timeout's thread method (os._exit, no teardown) and signal method; SIGKILL of an
    xdist controller while each worker holds an engine; SIGTERM and SIGHUP with an engine up
    (pytest still prints its summary)."""
    _need("xdist", "pytest_timeout")
    timeout = ("--timeout=3", "-o", "timeout_func_only=true")
    _run_all([
        Scenario("timeout-thread", "test_engine", args=(*timeout, "--timeout-method=thread")),
        Scenario("timeout-signal", "test_engine", args=(*timeout, "--timeout-method=signal")),
        Scenario("xdist-sigkill", "test_engine_per_worker", args=("-n", "2"), sig=signal.SIGKILL,
                 ready=("gw0", "gw1")),
        Scenario("sigterm-engine", "test_engine", sig=signal.SIGTERM, summary=True),
        Scenario("sighup-engine", "test_engine", sig=signal.SIGHUP, summary=True),
    ], tmp_path)
