"""Settings that do what they say: README tables checked against the plugin, --help with types and
defaults, --version, pretended GPUs that do not move work to CUDA, GPU leases that skip without a
GPU, the doctor's header line on a CPU machine, negative controls that say what the engine was,
and progress lines on a terminal only."""

from __future__ import annotations

import importlib.util
import os
import pty
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pytest_miles import config as options
from pytest_miles import plugin
from pytest_miles.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_option_is_in_the_readme_table_with_its_ini_key_and_env():
    rows = [ln for ln in README.splitlines() if ln.startswith("| `--miles-")]
    missing = []
    for s in options.SETTINGS:
        row = next((r for r in rows if r.startswith(f"| `{s.cli}`") or r.startswith(f"| `{s.cli} ")), None)
        if row is None or f"`{s.ini}`" not in row or (s.env and f"`{s.env}`" not in row):
            missing.append(s.cli)
    assert not missing, f"options missing from README's settings table (with ini key and env): {missing}"


def test_every_extra_is_in_the_readme_extras_table():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    missing = [e for e in extras if not re.search(rf"^\| `\[?{e}\]?`", README, re.M)
               and f"| `pytest-miles[{e}]`" not in README]
    assert not missing, f"extras missing from README's extras table: {missing}"


def test_every_fixture_is_in_the_readme():
    names = [n for n, v in vars(plugin).items() if type(v).__name__ == "FixtureFunctionDefinition"
             or hasattr(v, "_pytestfixturefunction") or hasattr(v, "_fixture_function_marker")]
    assert len(names) >= 10, names
    missing = [n for n in names if f"`{n}" not in README]
    assert not missing, f"fixtures missing from README: {missing}"


def test_help_shows_type_default_ini_and_env(pytester):
    text = re.sub(r"\s+", " ", pytester.runpytest("--help").stdout.str())
    for s in options.SETTINGS:
        assert f"[{options.type_name(s)}; default:" in text, s.name
        assert f"env {s.env}]" in text, s.name
    assert "--miles-trials=INT Trials per batch-invariance check mode. [int; default: 10;" in text
    assert "miles_require_gpu (bool):" in text and "miles_trials (int):" in text


@pytest.mark.parametrize("key,value,accepted", [
    ("miles_trials", "many", "is not an integer"), ("miles_trials", "1.5", "is not an integer"),
    ("miles_engine_timeout", "soon", "is not a number"), ("miles_require_gpu", "maybe", "is not a boolean"),
    ("miles_snapshot_update", "2", "is not a boolean"), ("miles_engine", "vllm", "is not one of reference"),
])
def test_bad_ini_value_is_named(pytester, key, value, accepted):
    """Key, file and what is accepted, on every pytest the project supports (pytest 9.2 converts
    typed ini values itself and would otherwise say only "invalid literal for int()")."""
    ini = pytester.makeini(f"[pytest]\n{key} = {value}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: ini key {key} in {ini}: {value!r} {accepted}" in result.stderr.str()
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_bad_ini_override_is_named(pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-o", "miles_trials=many")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key miles_trials" in result.stderr.str() and "'many' is not an integer" in result.stderr.str()


def test_typed_values_in_pyproject(pytester):
    """`[tool.pytest.ini_options]` (every pytest) and, on pytest >= 9, native `[tool.pytest]` with TOML types."""
    pytester.makepyfile(test_x="def test_x(miles_settings): assert miles_settings('trials') == 7")
    pytester.makepyprojecttoml("[tool.pytest.ini_options]\nmiles_trials = 7\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    if int(pytest.__version__.split(".")[0]) >= 9:
        pytester.makepyprojecttoml("[tool.pytest]\nmiles_trials = 7\nmiles_require_gpu = false\n")
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
        for bad, said in (("1.5", "1.5 is not an integer"), ('"many"', "'many' is not an integer"),
                          ("[1, 2]", "[1, 2] is not an integer")):
            path = pytester.makepyprojecttoml(f"[tool.pytest]\nmiles_trials = {bad}\n")
            result = pytester.runpytest("-p", "no:cacheprovider")
            assert result.ret == pytest.ExitCode.USAGE_ERROR, bad
            assert f"ini key miles_trials in {path}: {said}" in result.stderr.str(), result.stderr.str()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("pytest-miles 0.1.0 (pytest ")


def test_header_is_quiet_about_gpu_only_variables_without_a_gpu(pytester, monkeypatch):
    for var in ("NCCL_ALGO", "NVTE_ALLOW_NONDETERMINISTIC_ALGO", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--miles-gpu-class=none")
    result.stdout.fnmatch_lines(["miles: doctor: * 0 failing, 3 GPU-only not applicable (no NVIDIA GPU)"])
    assert "run `pytest-miles doctor`" not in result.stdout.str()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (pytest-miles[torch])")
def test_a_pretended_gpu_does_not_move_engines_or_trainers_to_cuda(pytester):
    pytester.makepyfile("""
        def test_devices(engine_factory, megatron_trainer_factory, miles_hardware):
            assert miles_hardware.nvidia  # the pretended H100 (markers see it)
            assert engine_factory("reference").device == "cpu"  # the real machine has no GPU
            assert megatron_trainer_factory(seed=1).device == "cpu"
    """)
    pytester.runpytest_subprocess("--miles-gpu-class=h100").assert_outcomes(passed=1)


@pytest.mark.parametrize("require", [False, True])
def test_gpu_lease_skips_without_a_gpu_or_fails_under_require_gpu(pytester, require):
    pytester.makepyfile("""
        def test_lease(miles_gpu_lease):
            miles_gpu_lease(1)
    """)
    result = pytester.runpytest("-rs", "--miles-gpu-class=none", *(["--miles-require-gpu"] if require else []))
    result.assert_outcomes(**({"failed": 1} if require else {"skipped": 1}))
    result.stdout.fnmatch_lines(["*miles_gpu_lease(1) requires an NVIDIA GPU; found*"])


def test_negative_control_on_a_deterministic_engine_says_so():
    from pytest_miles.checks.batch_invariance import negative_control
    from pytest_miles.engines.base import Output

    class FakeDeterministicEngine:  # a deliberate fake: an engine whose outputs never vary
        name, vocab_size, deterministic = "fake-deterministic", 50, True

        def generate(self, prompts, params=None):
            return [Output([1, 2], [-0.5, -0.25]) for _ in prompts]

    with pytest.raises(AssertionError) as info:
        negative_control(FakeDeterministicEngine(), "single", 2, max_batch=2, prompt_len=4)
    msg = str(info.value)
    assert "deterministic / batch-invariant mode ON" in msg and "determinism off" not in msg.split("\n")[0].replace(
        "with it off", "")


PROGRESS = """
from pytest_miles import assert_batch_invariant
from pytest_miles.engines.base import Output

class FakeInvariantEngine:  # a deliberate fake: a batch-invariant engine without torch
    name, vocab_size, deterministic = "fake", 50, True

    def generate(self, prompts, params=None):
        return [Output([1, 2], [-0.5, -0.25]) for _ in prompts]

def test_progress():
    assert_batch_invariant(FakeInvariantEngine(), mode="single", trials=3, max_batch=2, prompt_len=4)
"""


def _in_a_terminal(cwd: Path, *args: str) -> str:
    """pytest's output when its stdout is a terminal (a pseudo-terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                            stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(leader)
    return out.decode(errors="replace")


def test_progress_line_on_a_terminal_quiet_under_q_and_in_ci_logs(pytester):
    pytester.makepyfile(test_progress=PROGRESS)
    tty = _in_a_terminal(pytester.path)
    assert "\r[miles] batch invariance [single]: 3/3" in tty, tty
    assert "[miles]" not in _in_a_terminal(pytester.path, "-q")
    log = pytester.runpytest_subprocess()  # stdout is a pipe, as in a CI log
    log.assert_outcomes(passed=1)
    assert "[miles]" not in log.stdout.str()


def test_invalid_precision_cells_are_named_as_rejection_checks(pytester):
    from pytest_miles.facts.precision import precision_matrix

    params = precision_matrix()
    invalid = [p for p in params if not p.values[0].valid]
    assert invalid and all(p.id.endswith("-rejected") for p in invalid)
    assert all(not p.id.endswith("-rejected") for p in params if p.values[0].valid)
    pytester.makepyfile("""
        import pytest
        from pytest_miles.facts.precision import precision_matrix

        @pytest.mark.parametrize("cell", precision_matrix())
        def test_cell(cell):
            if not cell.valid:
                cell.assert_rejected()
    """)
    result = pytester.runpytest("-v", "--miles-gpu-class=none")
    result.stdout.fnmatch_lines(["*test_cell[[]rollout=fp8_blockwise-train=mxfp8-rejected[]] PASSED*"])
