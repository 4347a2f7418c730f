"""The doctor, CLI and pytest header, on real environments and a planted flash_attn_3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_miles.facts.environment import deterministic_env_vars

GOOD = deterministic_env_vars()


def doctor(env_overrides: dict[str, str | None], tmp_path, extra_path: str | None = None, *args: str):
    import os

    env = {k: v for k, v in os.environ.items() if k not in GOOD and k != "PYTHONPATH"}
    env.update(GOOD)
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    from pathlib import Path

    # this checkout's package (not another installed copy), and a planted module when asked
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, root) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest_miles.cli", "doctor", "--json", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return proc.returncode, json.loads(proc.stdout)


def finding(report: dict, check: str) -> dict:
    return next(f for f in report["findings"] if f["check"] == check)


def test_clean_environment_passes(tmp_path):
    rc, report = doctor({}, tmp_path)
    assert rc == 0 and report["ok"], report
    assert report["fingerprint"]["env"] == GOOD


@pytest.mark.parametrize("var,value,detail,symptom", [
    ("NCCL_ALGO", None, "not set", "Hashes diverge across nodes"),
    ("NCCL_ALGO", "Tree", "'Tree' is not deterministic", "Hashes diverge across nodes"),
    ("CUBLAS_WORKSPACE_CONFIG", None, "not set", "cuBLAS GEMM"),
    ("CUBLAS_WORKSPACE_CONFIG", ":0:0", "':0:0' is not deterministic", "cuBLAS GEMM"),
    ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1", "'1' is not deterministic", "Transformer-Engine"),
    ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", None, "not set", "Transformer-Engine"),
])
def test_each_bad_env_var_is_a_finding(tmp_path, var, value, detail, symptom):
    rc, report = doctor({var: value}, tmp_path, None, "--gpu-class", "h100")  # GPU-only variables: a GPU
    assert rc == 1 and not report["ok"]
    f = finding(report, var)
    assert f["status"] == "fail" and detail in f["detail"] and symptom in f["symptom"], f
    assert f["fix"].startswith("export " + var)
    others = [g for g in report["findings"] if g["status"] == "fail" and g["check"] != var]
    assert not others, others


def test_cublas_16_8_is_accepted(tmp_path):
    rc, report = doctor({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, tmp_path)
    assert rc == 0, report


@pytest.mark.parametrize("module", ["flash_attn_3", "flash_attn_interface"])
def test_planted_flash_attention_3_is_found(tmp_path, module):
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / f"{module}.py").write_text("raise RuntimeError('the doctor must not import me')\n")
    rc, report = doctor({}, tmp_path, str(plant))
    f = finding(report, "flash-attention-3")
    assert rc == 1 and f["status"] == "fail"
    assert module in f["detail"] and "Hashes diverge after iter 1" in f["symptom"]
    assert f["fix"] == "pip uninstall flash_attn_3 -y"


def test_attention_backend_outside_deterministic_set(tmp_path):
    rc, report = doctor({}, tmp_path, None, "--attention-backend", "torch_native")
    f = finding(report, "sglang attention backend")
    assert rc == 1 and f["status"] == "fail"
    assert "Hashes match for trainer but not SGLang" in f["symptom"]
    rc, report = doctor({}, tmp_path, None, "--attention-backend", "triton")
    assert rc == 0


def test_torch_deterministic_check_in_process():
    torch = pytest.importorskip("torch")
    from pytest_miles.facts.doctor import check_torch_deterministic
    from pytest_miles.facts.environment import DeterministicEnvironment

    assert not torch.are_deterministic_algorithms_enabled()
    assert check_torch_deterministic().status == "fail"
    with DeterministicEnvironment():
        assert check_torch_deterministic().status == "ok"
    assert check_torch_deterministic().status == "fail"


def test_header_shows_doctor_summary_and_fingerprint(pytester, monkeypatch):
    for k in GOOD:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--miles-gpu-class=h100")
    result.stdout.fnmatch_lines([
        "miles: 1 x NVIDIA H100 80GB HBM3 (sm_90)*fingerprint *",
        "miles: doctor: * 3 failing (NCCL_ALGO, NVTE_ALLOW_NONDETERMINISTIC_ALGO, CUBLAS_WORKSPACE_CONFIG)*",
    ])
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    pytester.runpytest().stdout.fnmatch_lines(["miles: doctor: * 0 failing"])


@pytest.mark.parametrize("gpu_class", ["none", "h100"])
@pytest.mark.parametrize("overrides", [{}, {"NCCL_ALGO": None}, {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
                                       {k: None for k in GOOD}])
def test_doctor_and_header_give_one_verdict_on_the_same_environment(pytester, monkeypatch, tmp_path,
                                                                     gpu_class, overrides):
    """The same machine and variables: the doctor's exit code and the header's "failing" agree,
    and what the header calls not applicable the doctor does not fail on."""
    rc, report = doctor(overrides, tmp_path, None, "--gpu-class", gpu_class)
    doctor_failing = [f["check"] for f in report["findings"] if f["status"] == "fail"]
    for k in GOOD:
        monkeypatch.delenv(k, raising=False)
    for k, v in {**GOOD, **overrides}.items():
        if v is not None:
            monkeypatch.setenv(k, v)
    pytester.makepyfile("def test_x(): pass")
    header = next(ln for ln in pytester.runpytest_subprocess(f"--miles-gpu-class={gpu_class}").outlines
                  if ln.startswith("miles: doctor:"))
    if doctor_failing:
        expected = f"{len(doctor_failing)} failing ({', '.join(doctor_failing)})"
        assert rc == 1 and expected in header, (report, header)
    else:
        assert rc == 0 and " 0 failing" in header, (report, header)
    not_applicable = sum(f["status"] == "skip" and "matters only with NVIDIA GPUs" in f["detail"]
                         for f in report["findings"])
    assert (f"{not_applicable} GPU-only not applicable" in header) == bool(not_applicable)
    if gpu_class == "none":
        assert rc == 0  # a CPU machine: GPU-only variables are not applicable, for both


def test_runtime_env_gates_a_launch_on_a_cpu_machine(tmp_path):
    """`doctor --runtime-env` judges the run's environment, not this shell's: exit 0 when it is right
    (this shell has none of the variables), 1 when it lacks one, on a machine without a GPU."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"env_vars": GOOD}))
    bad.write_text(json.dumps({"env_vars": {k: v for k, v in GOOD.items() if k != "NCCL_ALGO"}}))
    empty_shell = {k: None for k in GOOD}
    for gpu_class in ("none", "h100"):
        rc, report = doctor(empty_shell, tmp_path, None, "--gpu-class", gpu_class, "--runtime-env", str(good))
        assert rc == 0, report
        rc, report = doctor(empty_shell, tmp_path, None, "--gpu-class", gpu_class, "--runtime-env", str(bad))
        assert rc == 1 and [f["check"] for f in report["findings"] if f["status"] == "fail"] == \
            [f"NCCL_ALGO (runtime_env {bad})"], report
