"""Issue 18 on a real GPU host: what a CPU machine can only show by pretending.

- the engine fixtures' device follows the real GPU (auto -> cuda), and the helpers record their
  checks with --miles-trials, into the JSON and the self-contained HTML report;
- miles_gpu_lease(1) leases a real device (it skips only without a GPU);
- the doctor's header line counts the GPU-only variables here (not "not applicable").

    python3 -m pytest tests/gpu/test_gpu_adoption.py -v -rs -p no:cacheprovider --miles-require-gpu
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

INNER = """
from pytest_miles import assert_batch_invariant

def test_rollout_on_the_real_gpu(engine_factory):
    eng = engine_factory("reference")
    assert eng.device == "cuda", eng.device
    report = assert_batch_invariant(eng, mode="single", prompt_len=16)
    assert report.trials == 3  # --miles-trials reached the helper

def test_lease(miles_gpu_lease):
    lease = miles_gpu_lease(1)
    assert lease.devices, lease
"""


def test_engines_follow_the_gpu_and_the_report_records_the_helpers(pytester, monkeypatch):
    for var in ("NCCL_ALGO", "NVTE_ALLOW_NONDETERMINISTIC_ALGO", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(INNER)
    out = pytester.path / "report"
    result = pytester.runpytest_subprocess("-v", "-p", "no:randomly", "--miles-trials=3", "--miles-require-gpu",
                                           f"--miles-report={out / 'r.json'}", f"--miles-report-html={out / 'r.html'}",
                                           timeout=500)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["miles: doctor: * 3 failing (NCCL_ALGO, NVTE_ALLOW_NONDETERMINISTIC_ALGO, "
                                 "CUBLAS_WORKSPACE_CONFIG)*"])
    data = json.loads((out / "r.json").read_text())
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["batch invariance [single]"]["outcome"] == "passed"
    assert checks["batch invariance [single]"]["figures"]["trials"] == 3
    assert data["totals"]["failed"] == 0 and data["fingerprint"]["gpu_name"]
    assert "batch invariance [single]" in (out / "r.html").read_text()
