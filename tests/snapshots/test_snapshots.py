"""Determinism snapshots: record, compare, diagnose, xdist safety, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_miles.snapshots.store import SnapshotError, SnapshotStore, config_digest, diagnose

ROOT = Path(__file__).resolve().parents[2]

TOKENS = """
def test_rollout(determinism_snapshot):
    determinism_snapshot.check("tokens", [5, 6, 7, 8])
    determinism_snapshot.check("logprobs", VALUES)
"""


def write_tests(pytester, values="[-0.5, -1.25, -2.0, -0.125]"):
    pytester.makepyfile(test_snap="VALUES = " + values + "\n" + TOKENS)


def snapshot_file(pytester):
    return pytester.path / "fixtures" / "snapshots" / "test_snap.json"


def test_record_then_compare(pytester):
    write_tests(pytester)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no record in*run with --miles-snapshot-update*"])
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=1)
    pytester.runpytest().assert_outcomes(passed=1)
    data = json.loads(snapshot_file(pytester).read_text())
    (conf,) = data["configurations"].values()
    assert set(conf["records"]) == {"test_rollout::tokens", "test_rollout::logprobs"}


def test_changed_value_fails_with_first_difference(pytester):
    write_tests(pytester)
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=1)
    write_tests(pytester, "[-0.5, -1.25, -2.0000002, -0.125]")
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_rollout::logprobs in *test_snap.json*digest * (record) vs * (this run); "
                                 "first difference [[]2[]]: -2.0 (-0x1.0000000000000p+1) vs -2.0000002*"])
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=1)  # update writes the failing one
    pytester.runpytest().assert_outcomes(passed=1)


def _as_if_recorded_with_other_cudnn(pytester):
    path = snapshot_file(pytester)
    data = json.loads(path.read_text())
    (key, conf), = data["configurations"].items()
    conf["fingerprint"]["cudnn"] = "9.19.0"  # as if recorded on the GPU host
    data["configurations"] = {config_digest(conf["fingerprint"]): conf}
    path.write_text(json.dumps(data))


def test_other_configuration_with_equal_values_passes_with_a_note(pytester):
    write_tests(pytester)
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=1)
    _as_if_recorded_with_other_cudnn(pytester)
    out = pytester.path / "r.json"
    result = pytester.runpytest(f"--miles-report={out}")
    result.assert_outcomes(passed=1)
    notes = [c["figures"].get("note") for c in json.loads(out.read_text())["checks"]]
    assert len(notes) == 2
    assert all("equal to the record of another configuration" in n and "cuDNN 9.19.0 -> None" in n for n in notes)


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_other_configuration_with_other_values_names_each_field_after_every_check_ran(pytester, mode):
    pytester.makepyfile(test_snap="""
        VALUES = [1.0]

        def test_rollout(determinism_snapshot, miles_record):
            determinism_snapshot.check("tokens", VALUES)
            determinism_snapshot.check("logprobs", VALUES)
            miles_record("after both checks")
    """)
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=1)
    _as_if_recorded_with_other_cudnn(pytester)
    (pytester.path / "test_snap.py").write_text((pytester.path / "test_snap.py").read_text().replace("[1.0]", "[2.0]"))
    out = pytester.path / "r.json"
    result = pytester.runpytest("-rs", f"--miles-snapshot-other-config={mode}", f"--miles-report={out}")
    result.assert_outcomes(**{"skipped" if mode == "skip" else "failed": 1})
    result.stdout.fnmatch_lines(["*snapshot tokens, logprobs: only another configuration has a record, and this "
                                 "run's value differs from it*"])
    text = result.stdout.str()
    for name in ("tokens", "logprobs"):
        assert f"test_rollout::{name} in" in text
    assert "cuDNN 9.19.0 -> None (Hashes match locally but not on a different machine: cuDNN version mismatch)" in text
    checks = {c["check"]: c["outcome"] for c in json.loads(out.read_text())["checks"]}
    assert checks["after both checks"] == ("skipped" if mode == "skip" else "failed")  # the test went on


def test_configuration_holds_what_decides_bits_only():
    from pytest_miles.snapshots.store import configuration

    base = {"gpu_name": None, "packages": {"torch": "2.13.0", "ray": None},
            "cpu": "AMD EPYC 7B13 [avx2 avx512f avx512_bf16]", "env": {"NCCL_ALGO": "Ring"}}
    with_ray = {**base, "packages": {"torch": "2.13.0", "ray": "2.60.0"}}
    other_model = {**base, "cpu": "AMD EPYC 9654 [avx2 avx512f avx512_bf16]"}
    assert configuration(base, {}) == configuration(with_ray, {}) == configuration(other_model, {})
    assert configuration(base, {}) != configuration({**base, "cpu": "AMD EPYC [avx2]"}, {})  # ATen dispatch differs
    gpu = {**base, "gpu_name": "NVIDIA H100"}
    assert "cpu" not in configuration(gpu, {})  # GPU runs: the CPU does not decide the bits


def test_diagnosis_names_the_guide_causes():
    lines = diagnose({"cudnn": "9.19", "env.NCCL_ALGO": "Ring", "config.attention_backend": "flashinfer"},
                     {"cudnn": "9.10", "env.NCCL_ALGO": None, "config.attention_backend": "torch_native"})
    assert "cuDNN 9.19 -> 9.10 (Hashes match locally but not on a different machine: cuDNN version mismatch)" in lines
    assert any(line.startswith("env.NCCL_ALGO Ring -> None (Hashes diverge across nodes") for line in lines)
    assert any("--sglang-attention-backend flashinfer not set" in line for line in lines)


def test_subset_run_deletes_nothing_and_lists_unused(pytester):
    pytester.makepyfile(test_snap="""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_many(determinism_snapshot, i):
            determinism_snapshot.check("value", [i, i + 1])
    """)
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=4)
    before = json.loads(snapshot_file(pytester).read_text())
    result = pytester.runpytest("-k", "0 or 1")
    result.assert_outcomes(passed=2, deselected=2)
    result.stdout.fnmatch_lines(["*2 snapshot records not used by this run (kept, not deleted)*",
                                 "*test_many[[]2[]]::value*"])
    assert json.loads(snapshot_file(pytester).read_text()) == before


XDIST = """
import pytest

@pytest.mark.parametrize("w", range(4))
@pytest.mark.parametrize("i", range(50))
def test_record(determinism_snapshot, w, i):
    determinism_snapshot.check("r", [w, i, w * 1000 + i])
"""


@pytest.mark.slow
def test_concurrent_xdist_runs_lose_and_tear_nothing(pytester):
    pytester.makepyfile(test_snap=XDIST)
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-n", "4", "-p", "no:cacheprovider",
                               "--miles-snapshot-update"], cwd=pytester.path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(5)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-3000:]
    store = SnapshotStore(pytester.path / "fixtures" / "snapshots")
    data = store.read(snapshot_file(pytester))  # validates every digest
    (conf,) = data["configurations"].values()
    assert len(conf["records"]) == 200
    for w in range(4):
        for i in range(50):
            assert conf["records"][f"test_record[{i}-{w}]::r"]["value"] == [w, i, w * 1000 + i]


# ---- bad input -----------------------------------------------------------------------------------


def test_corrupt_and_hand_edited_files_are_named(pytester):
    write_tests(pytester)
    pytester.runpytest("--miles-snapshot-update").assert_outcomes(passed=1)
    path = snapshot_file(pytester)
    good = path.read_text()
    data = json.loads(good)
    (conf,) = data["configurations"].values()
    conf["records"]["test_rollout::tokens"]["value"] = [5, 6, 7, 9]
    path.write_text(json.dumps(data))
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*test_snap.json: record 'test_rollout::tokens' was edited by hand*"])
    path.write_text(good[:-40])
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*test_snap.json: corrupt snapshot file*"])


def test_unwritable_snapshot_dir(pytester):
    write_tests(pytester)
    (pytester.path / "blocker").write_text("")
    result = pytester.runpytest("--miles-snapshot-update", "--miles-snapshot-dir=blocker/snaps")
    result.stdout.fnmatch_lines(["*snapshot dir *blocker/snaps: cannot be created*"])


def test_same_record_twice_is_an_error(pytester):
    pytester.makepyfile(test_snap="""
        def test_twice(determinism_snapshot):
            determinism_snapshot.check("x", [1])
            determinism_snapshot.check("x", [2])
    """)
    result = pytester.runpytest("--miles-snapshot-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*record 'x' written twice by test_snap.py::test_twice (file *test_snap.json)*"])


def test_unsupported_values():
    with pytest.raises(SnapshotError, match="cannot snapshot a object"):
        from pytest_miles.snapshots.store import canonical

        canonical(object())


def test_malformed_files_from_another_machine_are_named_never_a_stray_exception(tmp_path):
    """Seeded: a real record file (an H100's, committed) with fields removed, added or given values of every other
    type, then its keys and digests made consistent again (as a careless tool would leave it, so that the damage
    gets past the hand-edit guards): every check answers or raises SnapshotError naming the file."""
    import random

    from pytest_miles.snapshots.store import digest_of
    from tests.helpers.mutate import mutate

    src = ROOT / "fixtures" / "snapshots" / "tests" / "snapshots" / "test_cross_machine_snapshots.json"
    base = json.loads(src.read_text())
    key, conf = next(iter(base["configurations"].items()))
    rid = next(iter(conf["records"]))
    other = {**conf["fingerprint"], "gpu_name": "NVIDIA H200"}
    rng, outcomes = random.Random("snapshot-files"), {"answered": 0, "named": 0}

    def consistent(data):
        if isinstance(data, dict) and isinstance(data.get("configurations"), dict):
            for c in list(data["configurations"].values()):
                records = c.get("records") if isinstance(c, dict) else None
                for rec in records.values() if isinstance(records, dict) else ():
                    if isinstance(rec, dict) and rec.get("value") is not None and rng.random() < 0.7:
                        rec["digest"] = digest_of(rec["value"])
            data["configurations"] = {rekey(k, c): c for k, c in data["configurations"].items()}
        return data

    def rekey(key, c):  # whatever the fingerprint became, the key its digest gives
        try:
            return config_digest(c.get("fingerprint") or {})
        except (AttributeError, TypeError, ValueError):
            return key


    for k in range(500):
        path = tmp_path / "mod.json"
        damaged = json.dumps(consistent(mutate(base, rng)))
        for update, fingerprint, record in ((False, conf["fingerprint"], rid), (False, other, rid),
                                            (False, other, "new::x"), (True, other, rid)):
            path.write_text(damaged)
            try:
                SnapshotStore(tmp_path, update=update).check("mod", record, [6.25, 6.5], fingerprint)
                outcomes["answered"] += 1
            except SnapshotError as exc:
                assert str(path) in str(exc), (k, exc)
                outcomes["named"] += 1
        SnapshotStore(tmp_path).all_records()  # the unused-records listing reads every file too
    assert outcomes["answered"] and outcomes["named"], outcomes
