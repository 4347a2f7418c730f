"""The JIT kernel caches in one directory, their cache key, and the doctor's warm/cold line."""

from __future__ import annotations

import json
import subprocess
import sys

from pytest_miles.facts.kernel_caches import CACHE_ENV, cache_env, cache_key, mark_warm, warm_state

FP = {"packages": {"sglang": "0.5.17", "flashinfer-python": "0.6.15", "torch": "2.11.0", "triton": "3.6.0"},
      "gpu_capability": "sm_90", "cuda_runtime": "13.0"}


def test_cache_env_puts_every_jit_cache_under_one_directory(tmp_path):
    env = cache_env(tmp_path, environ={})
    assert env == {"FLASHINFER_WORKSPACE_BASE": str(tmp_path / "flashinfer"),
                   "TRITON_CACHE_DIR": str(tmp_path / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    assert "TRITON_CACHE_DIR" not in cache_env(tmp_path, environ={"TRITON_CACHE_DIR": "/mine"})  # the user's wins
    assert cache_env(None, environ={}) == {}


def test_cache_key_follows_the_kernel_compiling_stack():
    key = cache_key(FP)
    assert key.startswith("miles-kernels-sm90-") and key == cache_key(json.loads(json.dumps(FP)))
    assert cache_key({**FP, "gpu_capability": "sm_100"}) != key
    assert cache_key({**FP, "packages": {**FP["packages"], "flashinfer-python": "0.7.4"}}) != key
    assert cache_key({**FP, "env": {"X": "1"}}) == key  # what does not compile kernels does not move it


def test_warm_after_an_engine_started_with_it(tmp_path):
    key = cache_key(FP)
    assert warm_state(None, key)[0] == "not set"
    assert warm_state(tmp_path, key)[0] == "cold"
    mark_warm(tmp_path, key, "sglang", "flashinfer", 270.4)
    state, detail = warm_state(tmp_path, key)
    assert state == "warm" and "sglang-flashinfer" in detail
    assert warm_state(tmp_path, cache_key({**FP, "gpu_capability": "sm_100"}))[0] == "cold"  # another stack


def test_doctor_prints_the_cache_key_and_state(tmp_path):
    env = {"PATH": "/usr/bin:/bin", CACHE_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pytest_miles.cli", "doctor", "--json"], capture_output=True,
                         text=True, env={**env, "PYTHONPATH": ":".join(sys.path)}, timeout=120)
    data = json.loads(out.stdout)["kernel_cache"]
    assert data["state"] == "cold" and data["key"].startswith("miles-kernels-") and str(tmp_path) in data["detail"]
    text = subprocess.run([sys.executable, "-m", "pytest_miles.cli", "doctor"], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": ":".join(sys.path)}, timeout=120).stdout
    assert f"kernel cache: cold: {tmp_path}" in text


def test_sglang_engine_gets_the_cache_and_names_its_cold_start(tmp_path):
    from pytest_miles.engines.server import SGLangEngine

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    eng = SGLangEngine(tmp_path / "model", kernel_cache_dir=tmp_path / "cache", log_dir=tmp_path / "logs")
    assert eng.env["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert "measured cold start 314 s, 238 s of it compiling kernels" in eng.start_advice
    assert CACHE_ENV in eng.start_advice
