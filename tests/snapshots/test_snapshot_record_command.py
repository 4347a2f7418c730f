"""Snapshots recorded on another machine: where this run's bits differ (another ISA, another GPU),
the skip names the one command that records this machine's own configuration, and after it the
same test passes here while the other machine's record stays."""

from __future__ import annotations

import json

TEST = """
import os

def test_bits(determinism_snapshot):
    determinism_snapshot.check("value", [float(os.environ["BITS"])])
"""


def test_the_skip_names_one_command_that_records_this_configuration(pytester, monkeypatch):
    pytester.makepyfile(test_snap=TEST)
    monkeypatch.setenv("BITS", "1.0")
    recorded = pytester.runpytest_subprocess("--miles-gpu-class=h100", "--miles-snapshot-update")
    recorded.assert_outcomes(passed=1)
    monkeypatch.setenv("BITS", "2.0")  # this machine's kernels give other bits
    result = pytester.runpytest_subprocess("--miles-gpu-class=none", "-rs")
    result.assert_outcomes(skipped=1)
    command = "pytest --miles-snapshot-update 'test_snap.py::test_bits'"
    result.stdout.fnmatch_lines(["*To record this machine's own configuration beside it (then commit the "
                                 f"file): {command}*"])
    args = command.split()[1:]
    again = pytester.runpytest_subprocess("--miles-gpu-class=none", args[0], args[1].strip("'"))
    again.assert_outcomes(passed=1)
    pytester.runpytest_subprocess("--miles-gpu-class=none").assert_outcomes(passed=1)
    files = list((pytester.path / "fixtures" / "snapshots").rglob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["configurations"]) == 2
