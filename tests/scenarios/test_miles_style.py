"""Miles-style CI: the helpers in a plain `python3` script (no pytest), and the doctor checking a
run's Ray runtime_env / --train-env-vars before the run, Megatron vs SGLang NCCL_ALGO included."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_miles.cli import main
from pytest_miles.facts.doctor_env import EnvInputError, check_run_env, load_runtime_env, parse_train_env_vars
from pytest_miles.facts.environment import deterministic_env_vars

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "miles_style" / "test_determinism_ci.py"


def test_the_plain_script_runs_the_helpers_without_pytest():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the script's engine needs torch (pip install 'pytest-miles[torch]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_CURRENT_TEST", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--trials", "3"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("PASS deterministic train env", "PASS batch invariance [single] on reference",
                 "PASS checkpoints equal"):
        assert line in result.stdout


def test_sglang_tp_setting_in_the_training_env_is_named_with_the_fix(tmp_path, capsys):
    f = tmp_path / "runtime_env.json"
    f.write_text(json.dumps({"env_vars": {**deterministic_env_vars(), "NCCL_ALGO": "allreduce:tree"}, "pip": []}))
    assert main(["doctor", "--runtime-env", str(f), "--sglang-tp", "2", "--gpu-class", "none"]) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] NCCL_ALGO vs Megatron and SGLang (runtime_env {f}): 'allreduce:tree' is rejected by Megatron" in out
    assert "megatron/training/arguments.py" in out and "set NCCL_ALGO=Ring in the training env" in out
    assert "run `pytest-miles doctor`" not in out  # not from within the doctor's own output


def test_ring_passes_and_says_what_sglang_sets_for_itself(capsys):
    main(["doctor", "--train-env-vars", json.dumps(deterministic_env_vars()), "--sglang-tp", "4",
          "--gpu-class", "none"])
    out = capsys.readouterr().out
    # (torch's in-process deterministic flag is reported too when another test imported torch here)
    assert [ln for ln in out.splitlines() if ln.startswith("[FAIL]") and "torch deterministic" not in ln] == []
    assert ("Ring passes Megatron's validator; SGLang sets NCCL_ALGO=allreduce:tree in its own server process "
            "with TP=4") in out


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a Ray runtime_env is a JSON object"),
    ('{"env_vars": {"NCCL_ALGO": ["Ring"]}}', "values must be strings (or numbers); not: NCCL_ALGO"),
])
def test_bad_runtime_env_names_the_file(tmp_path, capsys, content, expected):
    f = tmp_path / "re.json"
    f.write_text(content)
    assert main(["doctor", "--runtime-env", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "--runtime-env" in err and expected in err  # the file and the option named
    with pytest.raises(EnvInputError, match="--runtime-env"):
        load_runtime_env(str(f))


def test_bad_train_env_vars_and_missing_file_are_named(tmp_path):
    with pytest.raises(EnvInputError, match=r"--train-env-vars .*: not valid JSON"):
        parse_train_env_vars("NCCL_ALGO=Ring")
    with pytest.raises(EnvInputError, match=r"missing.json: --runtime-env .*no such file"):
        load_runtime_env(str(tmp_path / "missing.json"))


def test_a_missing_variable_in_the_run_env_fails_even_without_a_gpu_here():
    env = deterministic_env_vars()
    del env["CUBLAS_WORKSPACE_CONFIG"]
    failing = [f.check for f in check_run_env(env, "x") if f.status == "fail"]
    assert failing == ["CUBLAS_WORKSPACE_CONFIG (x)"]
