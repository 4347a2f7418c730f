"""GPU leasing under `pytest -n 2` on the GPU host: real CUDA work in subprocesses and real
engines (the embedded engine as a server on cuda), each on the devices its worker leased.

With one GPU the second worker waits for the first; with several, the workers get different
devices. Every process that touched a GPU reports the device UUID it saw."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

INNER = """
import json, os, subprocess, sys, time, pytest

PROBE = ("import json, torch; x = torch.ones(1 << 20, device='cuda'); torch.cuda.synchronize(); "
         "print(json.dumps({'count': torch.cuda.device_count(), "
         "'uuid': str(torch.cuda.get_device_properties(0).uuid)}))")

def _record(**row):
    with open(os.environ["MILES_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), **row}) + "\\n")

@pytest.mark.parametrize("n", range(4))
def test_cuda_work_on_the_leased_gpu(miles_gpu_lease, n):
    lease = miles_gpu_lease(1)
    start = time.time()
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **lease.env},
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["count"] == 1, "the subprocess sees exactly its leased GPU"
    time.sleep(1.0)
    _record(kind="cuda", devices=lease.devices, uuid=seen["uuid"], start=start, end=time.time())

@pytest.mark.parametrize("n", range(2))
def test_engine_on_the_leased_gpu(engine_factory, n):
    eng = engine_factory("reference-server")
    assert eng.generate([[5, 6, 7]])[0].output_ids
    lease = engine_factory.leases[-1]  # granted inside engine_factory, before the engine started
    assert eng.env["CUDA_VISIBLE_DEVICES"] == ",".join(lease.devices)
    _record(kind="engine", devices=lease.devices, start=lease.since, end=None,
            startup_s=eng.startup_seconds)
"""

CONFTEST = """
import json, os, time

def pytest_sessionfinish(session):  # after session fixtures (and the engines' leases) are gone
    with open(os.environ["MILES_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "kind": "session_end",
                            "end": time.time()}) + "\\n")
"""


def test_xdist_workers_lease_distinct_gpus_or_wait(pytester, monkeypatch, miles_hardware):
    pytest.importorskip("xdist")
    record = pytester.path / "leases.jsonl"
    monkeypatch.setenv("MILES_TEST_RECORD", str(record))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-v", "--miles-device=cuda",
                                           "--miles-require-gpu", timeout=540)
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    print(f"\n{len(miles_hardware.nvidia)} GPU(s): {miles_hardware.describe()}")
    for r in rows:
        print(json.dumps(r))
    result.assert_outcomes(passed=6)
    ends = {r["worker"]: r["end"] for r in rows if r["kind"] == "session_end"}
    spans = [r for r in rows if r["kind"] == "cuda"]
    for r in rows:  # an engine's lease lasts until its worker's session ends
        if r["kind"] == "engine":
            spans.append({**r, "end": ends[r["worker"]]})
    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                if a["worker"] != b["worker"] and a["start"] < b["end"] and b["start"] < a["end"]]
    shared = [(a, b) for a, b in overlaps if set(a["devices"]) & set(b["devices"])]
    assert shared == [], f"two workers held one GPU at the same time: {shared}"
    if len(miles_hardware.nvidia) == 1:
        assert overlaps == [], "one GPU: a worker waits until the other's lease ends"
        print("one GPU: no two workers ever held it at once (the second waited)")
    uuids = {r["worker"]: r["uuid"] for r in rows if r["kind"] == "cuda"}
    print("device UUIDs seen per worker:", uuids)
