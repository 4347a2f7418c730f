"""Fault injection: pytest killed at different points must leave no process and no listening port.

Real sessions (reference-server engines, megatron-core ranks training on gloo, a local Ray head,
pytest-xdist workers) are killed with SIGKILL, SIGTERM and SIGHUP, or ended by pytest-timeout's
thread and signal methods. Every process of a session carries a tag in its environment (inherited
by whatever it starts), so psutil finds every survivor, whoever its parent is now. Scenarios of one
test run in parallel (each is mostly waiting), so the module costs one session's startup, twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.fault_injection import STARTING_BOUND, Scenario, need, run_all

pytestmark = pytest.mark.timeout(240)

def test_signals_leave_no_process_and_no_port(tmp_path):
    """SIGKILL mid-training (engine, Ray head, two megatron ranks; SIGTERM too with MILES_SIGNAL_MATRIX=1)
    and SIGTERM with Ray up (Ray's handler must not turn it into SIGABRT; pytest still prints its
    summary): nothing survives, not even the head's temporary folder."""
    need("ray", "megatron.core")
    scenarios = [
        Scenario("sigkill-training", "test_engine_ray_and_training", sig=signal.SIGKILL, training=True),
        Scenario("sigterm-ray", "test_engine_and_ray", sig=signal.SIGTERM, summary=True),
    ]
    if os.environ.get("MILES_SIGNAL_MATRIX"):  # a third Ray head at once: seen racing for a port in CI
        # teardown of the engine, the ranks and the head: 12-27 s measured on 2 cores
        scenarios.append(Scenario("sigterm-training", "test_engine_ray_and_training", sig=signal.SIGTERM,
                                  training=True, summary=True, bound=45.0))
    run_all(scenarios, tmp_path)


def test_signals_leave_no_pooled_rank(tmp_path):
    """SIGKILL and SIGTERM while the session's pooled megatron-core ranks (two, gloo) wait between runs, and
    SIGKILL while two session spares (two ranks each, started in the background) wait for a session:
    neither rank nor its port survives pytest (parent-death signal, watchdog, or the pool's close)."""
    need("megatron.core")
    run_all([Scenario("sigkill-pooled", "test_pooled_ranks_idle", sig=signal.SIGKILL),
             Scenario("sigterm-pooled", "test_pooled_ranks_idle", sig=signal.SIGTERM, summary=True),
             Scenario("sigkill-spares", "test_session_spares_idle", sig=signal.SIGKILL)], tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_inside_ray_get_end_the_session(tmp_path, sig):
    """A stop signal while the test waits in ray.get (where Ray may catch the interruption): the
    session still ends, within the bound, with its summary and exit code 2, and leaves nothing."""
    need("ray")
    run_all([Scenario(f"{sig.name.lower()}-ray-get", "test_inside_ray_get", sig=sig, summary=True)], tmp_path)


def test_timeouts_and_xdist_leave_no_process_and_no_port(tmp_path):
    """pytest-timeout's thread method (os._exit, no teardown) and signal method; SIGKILL of an
    xdist controller while each worker holds an engine; SIGTERM and SIGHUP with an engine up
    (pytest still prints its summary)."""
    need("xdist", "pytest_timeout")
    timeout = ("--timeout=3", "-o", "timeout_func_only=true")
    run_all([
        Scenario("timeout-thread", "test_engine", args=(*timeout, "--timeout-method=thread")),
        Scenario("timeout-signal", "test_engine", args=(*timeout, "--timeout-method=signal")),
        Scenario("xdist-sigkill", "test_engine_per_worker", args=("-n", "2"), sig=signal.SIGKILL,
                 ready=("gw0", "gw1")),
        Scenario("sigterm-engine", "test_engine", sig=signal.SIGTERM, summary=True),
        Scenario("sighup-engine", "test_engine", sig=signal.SIGHUP, summary=True),
    ], tmp_path)


# Moments of a session with Ray: the head starting (the signal is held back while ray.init runs), Ray up
# and idle, a Ray task running; for pytest on a test file and for `pytest-miles suite`.
MOMENTS = {
    ("pytest", "ray-starting"): dict(test="test_ray_idle", starting="gcs_server", bound=STARTING_BOUND),
    ("pytest", "ray-idle"): dict(test="test_ray_idle", after=0.5),
    ("pytest", "ray-task"): dict(test="test_inside_ray_get"),
    ("suite", "ray-starting"): dict(test="", suite=True, starting="gcs_server", bound=STARTING_BOUND),
    ("suite", "ray-idle"): dict(test="", suite=True, ready=("ray-up",), idle=600.0, after=0.5),
    ("suite", "ray-task"): dict(test="", suite=True, ready=("call",), task=120.0, after=1.0),
}
STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _moment(target: str, moment: str, sig: int) -> Scenario:
    return Scenario(f"{sig.name.lower()}-{target}-{moment}", sig=sig, summary=True, **MOMENTS[target, moment])


@pytest.mark.slow
def test_stop_signals_with_ray_end_the_session_promptly(tmp_path):
    """One representative per signal, moment and target: SIGTERM to `pytest-miles suite` with Ray up and
    idle, SIGHUP to pytest while the head starts, SIGINT to the suite while a Ray task runs. Each ends
    within its bound with exit code 2 and a summary naming the signal, leaving no process, no listening
    port and no Ray temporary folder. MILES_SIGNAL_MATRIX=1 runs all 18 combinations."""
    need("ray")
    run_all([_moment("suite", "ray-idle", signal.SIGTERM), _moment("pytest", "ray-starting", signal.SIGHUP),
              _moment("suite", "ray-task", signal.SIGINT)], tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MILES_SIGNAL_MATRIX"), reason="the full signal matrix: MILES_SIGNAL_MATRIX=1")
@pytest.mark.parametrize("target,moment", sorted(MOMENTS), ids=lambda v: v)
def test_stop_signal_matrix(tmp_path, target, moment):
    """Every stop signal at every moment, for both targets (opt-in: 6 x ~60 s)."""
    need("ray")
    run_all([_moment(target, moment, sig) for sig in STOP], tmp_path)


RAY_INIT_SIGNAL = '''
import os, signal, sys, threading
import ray
from pytest_miles.placement import signals
from pytest_miles.placement.ray_cluster import RayCluster

signals.ensure()
real_init = ray.init

def init_then_signal(**kwargs):  # SIGTERM arrives while Ray initialises (it installs sys.exit on SIGTERM)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    return real_init(**kwargs)

ray.init = init_then_signal
try:
    cluster = RayCluster.start_local(sys.argv[1], timeout=120)
    import time
    time.sleep(5)  # the held-back signal is delivered to our handler as soon as Ray is up
    print("NOT INTERRUPTED")
except SystemExit as exc:
    print("SYSTEMEXIT", exc.code)
except signals.Terminated as exc:
    print("TERMINATED", exc)
finally:
    try:
        cluster.shutdown()
    except NameError:
        pass
    # start_local's own clean-up ran: the driver is disconnected (a driver left connected to the
    # head we killed makes Ray's exit hook wait without bound on the dead GCS)
    print("RAY_INITIALIZED", ray.is_initialized())
'''


def test_sigterm_during_ray_init_reaches_our_handler(tmp_path):
    """Ray's ray.init() installs a SIGTERM handler that calls sys.exit (seen: fixtures erroring with
    SystemExit 15, the session running on, or SIGABRT with no summary). Our start-up holds the
    signals back until our handler is back: the session is interrupted as by Ctrl-C, and the driver
    is disconnected before the head is stopped (else the process hangs at exit)."""
    need("ray")
    result = subprocess.run([sys.executable, "-c", RAY_INIT_SIGNAL, str(tmp_path)], capture_output=True, text=True,
                            timeout=180, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert "TERMINATED" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    assert "RAY_INITIALIZED False" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def test_a_swallowed_sigterm_still_ends_the_session(pytester):
    """A library that catches the interruption (KeyboardInterrupt) cannot keep the session alive:
    the session ends after that test, with its summary and exit code 2; later tests do not run."""
    pytester.makepyfile('''
        import os, signal, time

        def test_swallows():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # what some libraries do

        def test_never_runs():
            raise AssertionError("the session went on after SIGTERM")
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()[-2000:]
    assert "the running test caught the interruption" in result.stdout.str()
    assert "the session went on" not in result.stdout.str()
