"""The fault-injection harness: a real pytest session (engines, megatron-core ranks, a local Ray head,
xdist workers) in a subprocess, stopped by a signal or a timeout at a chosen moment, and every process
and port it leaves found by the tag in its environment. tests/placement/test_fault_injection.py runs it."""

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

INNER = textwrap.dedent('''
    import json, os, time
    import pytest
    import faulthandler, signal as _signal  # SIGUSR2: every thread's stack, for a session that hangs
    faulthandler.register(_signal.SIGUSR2, all_threads=True,
                          file=open(os.path.join(os.environ["MILES_FAULT_READY"], "stacks.txt"), "w"))

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

    def test_pooled_ranks_idle(megatron_trainer_factory, tmp_path):  # the signal finds pooled ranks between runs
        run = megatron_trainer_factory(world_size=2).train(1)
        assert run.process_run == 1
        ready("engine", port=0)
        time.sleep(600)

    def test_session_spares_idle(megatron_trainer_factory, miles_trainer_pool):  # spares started, none taken
        trainer = megatron_trainer_factory(world_size=2)
        miles_trainer_pool.prestart_sessions(trainer, 2)
        for spare in [g for stock in miles_trainer_pool.spares.values() for g in stock]:
            while len(list(spare.ready.iterdir())) < 2:  # every rank joined its group
                time.sleep(0.1)
        ready("engine", port=0)
        time.sleep(600)

    def test_ray_idle(ray_cluster):  # the signal arrives while Ray is up and nothing runs on it
        ready("engine", port=0)
        time.sleep(600)

    def test_inside_ray_get(ray_cluster):  # the signal arrives while the test waits in ray.get
        import ray

        @ray.remote(num_cpus=0)
        def slow():
            time.sleep(600)

        ref = slow.remote()
        time.sleep(2)
        ready("engine", port=0)
        ray.get(ref)

    @pytest.mark.parametrize("i", range(2))
    def test_engine_per_worker(eng, i):
        ready(os.environ.get("PYTEST_XDIST_WORKER", "main"), port=eng.port)
        time.sleep(600)
''')

# The inner session starts as from a terminal, whatever this runner ignores (under `nohup`, SIGHUP
# is ignored and children inherit that: the plugin rightly leaves an ignored signal ignored, so the
# SIGHUP scenario would test nothing). The dispositions are reset, then pytest is exec'd (same pid).
# The session starts as from a shell: the stop signals at their defaults and none blocked. An ignored signal
# and the signal mask survive exec, and the xdist worker that runs these tests may carry what Ray's native code
# set in it for an earlier test (an inherited SIG_IGN for SIGINT made the session deaf to it: it hung in
# ray.get, seen in full runs only, where another test had connected Ray in the same worker).
DEFAULT_SIGNALS = ("import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP, signal.SIGTERM, "
                   "signal.SIGINT)]; signal.pthread_sigmask(signal.SIG_SETMASK, []); "
                   "os.execv(sys.argv[1], sys.argv[1:])")

BOUND = 30.0  # seconds from a stop signal to pytest's exit, teardown included
# During Ray's start-up the signal is held back until ray.init returns (let through, it can reach a
# handler Ray's native code installed: SIGABRT, no summary); ray.init alone takes up to ~30 s when
# several sessions start Ray at once on 2 cores, hence the longer bound for that moment.
STARTING_BOUND = 60.0

# Loaded with `-p fault_probe` into `pytest-miles suite`: says when Ray is up (and then holds the
# test idle for MILES_FAULT_IDLE s) and when a test's body starts; with MILES_FAULT_TASK it then runs a
# Ray task of that many seconds on the suite's cluster first, so a signal lands while a Ray task runs
# (the suite's own tasks take about a second: a signal timed after them could arrive after the end).
PROBE = textwrap.dedent('''
    import json, os, time
    import pytest
    import faulthandler, signal as _signal  # SIGUSR2: every thread's stack, for a session that hangs
    faulthandler.register(_signal.SIGUSR2, all_threads=True,
                          file=open(os.path.join(os.environ["MILES_FAULT_READY"], "stacks.txt"), "w"))

    def ready(name):
        path = os.path.join(os.environ["MILES_FAULT_READY"], name)
        with open(path + ".tmp", "w") as f:
            json.dump({"port": 0}, f)
        os.replace(path + ".tmp", path)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(item):
        result = yield
        ready("ray-up")
        time.sleep(float(os.environ.get("MILES_FAULT_IDLE", "0")))
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item):
        ready("call")
        hold = float(os.environ.get("MILES_FAULT_TASK", "0"))
        if hold:
            import ray

            @ray.remote(num_cpus=0)
            def task():
                time.sleep(hold)

            ray.get(task.remote())
        return (yield)
''')

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
    suite: bool = False  # `pytest-miles suite -k test_cluster` (with the probe plugin) instead of pytest on INNER
    starting: str | None = None  # signal as soon as a process of the session has this in its command line
    after: float = 0.0  # seconds between ready and the signal
    idle: float = 0.0  # the probe holds the suite this long once Ray is up
    task: float = 0.0  # the probe runs a Ray task this long when a test's body starts
    bound: float = 0.0  # seconds from the signal to pytest's exit (0: BOUND)
    result: dict = field(default_factory=dict)


def _run(sc: Scenario, root: Path) -> Scenario:
    """Start the session, wait until its processes are up, kill it, then poll (up to 10 s) for
    survivors. Every step is bounded; the timeline goes into the result."""
    tag, ready_dir = uuid.uuid4().hex, root / f"ready-{sc.name}"
    ready_dir.mkdir()
    env = {**os.environ, TAG: tag, "MILES_FAULT_READY": str(ready_dir), "PYTHONUNBUFFERED": "1",
           "PYTEST_MILES_RAY_TIMEOUT": "120"}
    env["MILES_FAULT_IDLE"] = str(sc.idle)
    env["MILES_FAULT_TASK"] = str(sc.task)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_TESTRUNUID", None)
    log = root / f"{sc.name}.log"
    t0 = time.monotonic()
    timeline = []
    if sc.suite:  # the bundled suite's Ray tests, the probe plugin saying when Ray is up / a test runs
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        target = ["-m", "pytest_miles.cli", "suite", "-k", "test_cluster", "-p", "fault_probe"]
    else:
        target = ["-m", "pytest", f"{root / 'test_inner.py'}::{sc.test}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DEFAULT_SIGNALS, sys.executable, *target, "-p", "no:cacheprovider",
             "-p", "no:randomly", "-p", "no:hypothesispytest", "-p", "no:benchmark", "--rootdir", str(root),
             f"--basetemp={root / ('bt-' + sc.name)}", *sc.args],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ports: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if sc.starting is not None:
                if any(sc.starting in " ".join(_cmdline(p)) for p in tagged(tag)):
                    break
                time.sleep(0.05)
                continue
            files = [ready_dir / r for r in sc.ready]
            if all(f.exists() for f in files):
                info = [json.loads(f.read_text()) for f in files]
                if not sc.training or Path(info[0]["checkpoints"], "iter_0000001").exists():
                    break
            time.sleep(0.2)
        else:
            if proc.poll() is None:
                raise AssertionError(f"{sc.name}: the session was not ready within 150 s; "
                                     f"log:\n{log.read_text()[-3000:]}")
        if proc.poll() is not None:
            raise AssertionError(f"{sc.name}: the session ended (exit {proc.returncode}) before its processes were up; "
                                 f"log:\n{log.read_text()[-3000:]}")
        timeline.append(f"{time.monotonic() - t0:6.1f} s ready")
        time.sleep(sc.after)
        procs = tagged(tag)
        ours = {p.pid for p in procs}
        ports = listening(ours)
        temp_dirs = {a.split("=", 1)[1] for p in procs for a in _cmdline(p) if a.startswith("--temp-dir=")}
        sc.result["before"] = len(procs)
        t_sig = time.monotonic()
        if sc.sig is not None:
            os.kill(proc.pid, sc.sig)
            timeline.append(f"{time.monotonic() - t0:6.1f} s {signal.Signals(sc.sig).name} to pytest "
                            f"({len(procs)} processes, ports {sorted(ports)})")
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            timeline.append(f"{time.monotonic() - t0:6.1f} s pytest still running 90 s later: stacks, then SIGKILL")
            os.kill(proc.pid, signal.SIGUSR2)  # where it hangs, every thread (faulthandler, registered by the tests)
            time.sleep(2)
            stacks = ready_dir / "stacks.txt"
            sc.result["stacks"] = stacks.read_text(errors="replace")[-6000:] if stacks.exists() else ""
            proc.kill()
            proc.wait()
        t_exit = time.monotonic()
        sc.result["took"] = t_exit - t_sig
        timeline.append(f"{t_exit - t0:6.1f} s pytest exited with code {proc.returncode}")
        left = tagged(tag)
        while left and time.monotonic() - t_exit < 10:
            time.sleep(0.2)
            left = tagged(tag)
        timeline.append(f"{time.monotonic() - t0:6.1f} s {len(left)} processes left")
        held, reused = still_held(ports, ours, tag)
        if reused:
            timeline.append(f"{time.monotonic() - t0:6.1f} s ports let go and since taken by others: {reused}")
        sc.result["temp_left"] = sorted(d for d in temp_dirs if os.path.exists(d) and not d.startswith(str(root)))
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


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def run_all(scenarios: list[Scenario], root: Path) -> None:
    (root / "test_inner.py").write_text(INNER)
    (root / "fault_probe.py").write_text(PROBE)
    with ThreadPoolExecutor(len(scenarios)) as pool:
        done = list(pool.map(lambda sc: _run(sc, root), scenarios))
    problems = []
    for sc in done:
        r = sc.result
        print(f"--- {sc.name} (ended {r['took']:.1f} s after the signal)\n" + "\n".join(r["timeline"]))
        if r["left"] or r["ports"]:
            problems.append(f"{sc.name}: {len(r['left'])} processes and ports {r['ports']} left 10 s after pytest "
                            f"ended: {r['left']}")
        if sc.summary and (not SUMMARY.search(r["output"]) or r["code"] != 2):
            problems.append(f"{sc.name}: no summary, or exit code {r['code']} instead of 2 (interrupted); output "
                            f"tail:\n{r['output'][-2500:]}")
        named = signal.Signals(sc.sig).name if sc.sig else ""
        if sc.summary and sc.sig != signal.SIGKILL and f"session interrupted by {named}" not in r["output"]:
            problems.append(f"{sc.name}: the summary does not say the session was interrupted by {named}; output "
                            f"tail:\n{r['output'][-2500:]}")
        if sc.summary and r["took"] > (sc.bound or BOUND):
            stacks = f"; where it hung (every thread):\n{r['stacks']}" if r.get("stacks") else ""
            problems.append(f"{sc.name}: pytest took {r['took']:.1f} s to end after the signal "
                            f"(bound {sc.bound or BOUND} s){stacks}")
        if r["temp_left"]:
            problems.append(f"{sc.name}: Ray temporary folders left: {r['temp_left']}")
        if r["before"] < 2:
            problems.append(f"{sc.name}: only {r['before']} processes were up at the kill: the scenario tested "
                            f"nothing; output tail:\n{r['output'][-2500:]}")
    timelines = "\n".join(f"{sc.name}: " + "; ".join(t.strip() for t in sc.result["timeline"]) for sc in done)
    assert not problems, "\n\n".join(problems) + "\n\ntimelines:\n" + timelines


def need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m)
