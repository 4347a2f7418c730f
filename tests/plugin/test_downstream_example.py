"""examples/downstream, run as a user's repo would run it: with and without a (forced) GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "downstream"


@pytest.fixture
def repo(pytester):
    shutil.copytree(EXAMPLE, pytester.path, dirs_exist_ok=True)
    return pytester


def test_without_gpu_the_gpu_test_skips_with_reason(repo):
    result = repo.runpytest_subprocess("-rs", "--strict-markers", "--miles-gpu-class=none")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*requires hopper (sm_90); found no NVIDIA GPU*"])


@pytest.mark.slow
def test_with_a_hopper_both_tests_run(repo):
    # The override pretends an H100; the trainer still runs on this machine's CPU (--miles-device).
    result = repo.runpytest_subprocess("--strict-markers", "--miles-gpu-class=h100", "--miles-device=cpu")
    result.assert_outcomes(passed=2)


def test_strict_markers_catch_a_typo(repo):
    (repo.path / "tests" / "test_typo.py").write_text("import pytest\n\n@pytest.mark.hoper\ndef test_x():\n    pass\n")
    result = repo.runpytest_subprocess("tests/test_typo.py")
    result.stdout.fnmatch_lines(["*'hoper' not found in `markers` configuration option*"])
