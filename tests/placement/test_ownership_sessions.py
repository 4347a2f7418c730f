"""The ownership watchdog's sweep takes a root's session only while the root's pid is still ours: a
recycled pid (on a busy machine with pid_max 32768 pids wrap within minutes) is another process's
session, and killing it kills somebody else's work."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from pytest_miles.placement.ownership import _own_sessions


def test_a_live_root_and_a_gone_root_name_their_sessions():
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    created = psutil.Process(child.pid).create_time()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        live_created = psutil.Process(live.pid).create_time()
        child.wait()  # gone and reaped: its session may still hold orphans, so it still counts
        assert _own_sessions(psutil, {child.pid: created, live.pid: live_created}) >= {live.pid}
        if not psutil.pid_exists(child.pid):
            assert child.pid in _own_sessions(psutil, {child.pid: created})
    finally:
        live.kill()
        live.wait()


def test_a_recycled_pid_is_not_our_session():
    me = os.getpid()  # a live process whose creation time differs from the root's: the pid was reused
    real = psutil.Process(me).create_time()
    assert _own_sessions(psutil, {me: real - 100.0}) == set()
    assert _own_sessions(psutil, {me: real}) == {me}
