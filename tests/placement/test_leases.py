"""GPU leases under pytest-xdist: real file locks, real worker processes, real crashes.

On a CPU machine the GPU list comes from `--miles-gpu-class` (h100x2: two devices, h100: one);
the leasing logic only sees device names, so this is the same code path as on a GPU host, where
tests/gpu/test_gpu_leases.py repeats it with real devices."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pytest_miles.placement.leases import GpuLeaser, LeaseError, visible_tokens

pytestmark = pytest.mark.timeout(180)

INNER = """
import json, os, time, pytest

@pytest.mark.parametrize("n", range(4))
def test_holds_a_gpu(miles_gpu_lease, n):
    lease = miles_gpu_lease(1)
    start = time.time()
    time.sleep(1.0)
    with open(os.environ["MILES_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "devices": lease.devices,
                            "start": start, "end": time.time()}) + "\\n")
"""


def _intervals(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _overlapping_pairs(rows):
    return [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:] if a["start"] < b["end"] and b["start"] < a["end"]]


@pytest.mark.parametrize("gpus", ["h100x2", "h100"])
def test_xdist_workers_never_hold_the_same_gpu(pytester, monkeypatch, gpus):
    pytest.importorskip("xdist")
    record = pytester.path / "leases.jsonl"
    monkeypatch.setenv("MILES_TEST_RECORD", str(record))
    monkeypatch.setenv("PYTEST_MILES_GPU_LEASE_DIR", str(pytester.path / "leases"))  # not the machine's
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", f"--miles-gpu-class={gpus}", timeout=150)
    result.assert_outcomes(passed=4)
    rows = _intervals(record)
    assert {r["worker"] for r in rows} == {"gw0", "gw1"}, "both workers ran lease-holding tests"
    overlaps = _overlapping_pairs(rows)
    assert all(a["devices"] != b["devices"] for a, b in overlaps), f"two workers held one GPU at once: {overlaps}"
    if gpus == "h100":
        assert overlaps == [], "one GPU: the second worker waits for the first"
    else:
        assert {tuple(r["devices"]) for r in rows} <= {("0",), ("1",)}


def test_separate_pytest_processes_never_hold_the_same_gpu(pytester, monkeypatch):
    """Two CI jobs on one runner (two pytest processes, no xdist) share the machine-wide lock folder."""
    record = pytester.path / "leases.jsonl"
    monkeypatch.setenv("MILES_TEST_RECORD", str(record))
    monkeypatch.setenv("PYTEST_MILES_GPU_LEASE_DIR", str(pytester.path / "leases"))
    pytester.makepyfile(INNER)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "--miles-gpu-class=h100",
           "--miles-gpu-lease=on", "-k", "0 or 1", str(pytester.path)]
    procs = [subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=150)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = _intervals(record)
    assert len(rows) == 4 and _overlapping_pairs(rows) == [], f"two sessions held GPU 0 at once: {rows}"


def test_a_crashed_holder_releases_its_lease(tmp_path):
    holder = textwrap.dedent(f"""
        import os, sys
        from pytest_miles.placement.leases import GpuLeaser
        lease = GpuLeaser({str(tmp_path)!r}, ["0"], timeout=5, who="gw7").acquire(1, owner="the crashing test")
        print("held", flush=True)
        sys.stdin.readline()
        os._exit(9)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        leaser = GpuLeaser(tmp_path, ["0"], timeout=1, poll=0.1, who="gw1")
        with pytest.raises(LeaseError) as info:
            leaser.acquire(1, owner="test_b")
        assert "held: GPU 0: worker gw7" in str(info.value) and "for the crashing test" in str(info.value)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 9
        with leaser.acquire(1, owner="test_b") as lease:  # the kernel dropped the dead process's lock
            assert lease.env == {"CUDA_VISIBLE_DEVICES": "0"}
    finally:
        proc.kill()


def test_leases_are_all_or_nothing_and_a_worker_shares_its_own_gpus(tmp_path):
    mine = GpuLeaser(tmp_path, ["0", "1"], timeout=0.5, poll=0.1, who="gw0")
    engine = mine.acquire(1, owner="engine")
    trainer = mine.acquire(1, owner="trainer")
    assert trainer.devices == engine.devices == ["0"], "one worker's engine and trainer colocate"
    tp2 = mine.acquire(2, owner="tp=2 trainer")
    assert tp2.devices == ["0", "1"], "own GPU first, then a free one"
    tp2.release()
    other = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from pytest_miles.placement.leases import GpuLeaser, LeaseError
        leaser = GpuLeaser({str(tmp_path)!r}, ["0", "1"], timeout=0.5, poll=0.1, who="gw1")
        print(leaser.acquire(1).devices)
        try:
            leaser.acquire(2)
        except LeaseError as exc:
            print(exc)
    """)], capture_output=True, text=True, timeout=60)
    lines = other.stdout.splitlines()
    assert lines[0] == "['1']", other.stderr
    assert "gw1: no 2 free GPU(s)" in lines[1] and "GPU 0: worker gw0" in lines[1]
    engine.release()
    assert "0" in mine._held, "the trainer's lease still holds GPU 0"
    trainer.release()
    assert mine._held == {}
    with mine.acquire(2) as both:
        assert both.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(LeaseError, match="needs 3 GPU"):
        mine.acquire(3, owner="tp=3 engine")


def test_visible_devices_keep_the_parents_numbering():
    assert visible_tokens(2, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_tokens(1, {"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == ["GPU-abc"]
    assert visible_tokens(2, {}) == ["0", "1"]


def test_a_lease_of_no_gpus_is_refused(tmp_path):
    leaser = GpuLeaser(tmp_path, ["0"], timeout=0.1)
    for n in (0, -1, 1.5):
        with pytest.raises(LeaseError, match=rf"engine: n={n!r}; expected an integer >= 1 GPU"):
            leaser.acquire(n, owner="engine")
    assert list(tmp_path.iterdir()) == [], "nothing was locked or written"


def test_an_engine_that_fails_to_start_gives_its_lease_back(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine where the embedded server cannot start on cuda")
    from pytest_miles.engines.base import EngineError
    from pytest_miles.engines.factory import EngineFactory
    from pytest_miles.models.embedded import write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path / "model")
    leaser = GpuLeaser(tmp_path / "leases", ["0"], timeout=0.5, poll=0.1)
    # NEGATIVE CONTROL: on a CPU machine the embedded server cannot start on cuda
    factory = EngineFactory(model_dir=lambda: str(model), log_dir=tmp_path / "logs", hardware=lambda: None,
                            device="cuda", leaser=leaser, startup_timeout=60)
    with pytest.raises(EngineError, match="reference-server exited with code"):
        factory("reference-server")
    assert factory.leases == [] and leaser._held == {}, "the lease went back with the failed start"
