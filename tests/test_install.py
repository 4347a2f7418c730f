"""Install paths that work: an sdist and a wheel are built (the wheel from the sdist), `twine check`
passes, and the wheel, installed into a fresh venv WITHOUT the torch extra, runs the downstream
example with --strict-markers and -n 2: engine tests skip with the install hint (and fail under
--miles-require-gpu), and nothing warns about assertion rewriting.

The fresh venv has no system site-packages (the host's torch must not leak in), so its
dependencies (pytest, psutil, filelock, pytest-xdist: a few small wheels) come from the package
index through pip's cache: a few seconds on a machine with index access, which CI has (the
README's commands install from it). The build uses --no-isolation with the host's setuptools, so
it needs no download at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "downstream"
SKIP_DIRS = {".git", "build", "dist", ".pytest-miles", "__pycache__", ".nox", ".venv", "fixtures", "docs",
             "benchmarks", "tests"}


def _clean_env() -> dict[str, str]:
    """The user's environment, less what would let this checkout leak into the fresh venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(cmd, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=_clean_env())
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-3000:]}" \
                                   f"\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """Built once per run: under pytest-xdist the workers share it (file lock in the basetemp root)."""
    pytest.importorskip("build", reason="the dev extra brings `build` and `twine`")
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    tmp = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "miles-install"
    tmp.mkdir(exist_ok=True)
    with FileLock(str(tmp) + ".lock", timeout=600):
        py = tmp / "venv" / "bin" / "python"
        if not (tmp / "ready").exists():
            _build_and_install(tmp)
            (tmp / "ready").touch()
    return py


def _build_and_install(tmp: Path) -> None:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")])
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", src])
    sdist, wheel = sorted((tmp / "dist").glob("*.tar.gz")), sorted((tmp / "dist").glob("*.whl"))
    assert len(sdist) == 1 and len(wheel) == 1, list((tmp / "dist").iterdir())
    _run([sys.executable, "-m", "twine", "check", "--strict", sdist[0], wheel[0]])
    env = tmp / "venv"
    _run([sys.executable, "-m", "venv", env])
    py = env / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel[0], "pytest-xdist"])


@pytest.fixture
def downstream(tmp_path):
    repo = tmp_path / "downstream"
    shutil.copytree(EXAMPLE, repo)
    return repo


def test_the_fresh_venv_has_no_torch_and_the_cli_runs(venv):
    out = _run([venv, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('megatron'))"])
    assert out.stdout.split() == ["None", "None"]
    version = _run([venv.parent / "pytest-miles", "--version"]).stdout
    assert version.startswith("pytest-miles 0.1.0")


def test_the_installed_command_is_the_native_front_end_and_hands_over_to_python(venv, tmp_path):
    """`pytest-miles` is front.c (where a compiler was found at install), `pytest-miles-py` the Python
    command line; `compare` of two equal DCP dirs is answered by the first (this venv has no torch:
    the pair is written by this process), anything else by the second."""
    exe, cli = venv.parent / "pytest-miles", venv.parent / "pytest-miles-py"
    if shutil.which("cc") is None:
        pytest.skip("no C compiler at install: `pytest-miles` is the shell script that starts Python")
    assert exe.read_bytes()[:4] == b"\x7fELF" and cli.read_text().startswith(f"#!{venv}")
    pytest.importorskip("torch")
    from tests.helpers.checkpoints import make_state, save_dcp

    a, b = save_dcp(tmp_path / "a", make_state(0)), save_dcp(tmp_path / "b", make_state(0))
    out = _run([exe, "compare", a, b]).stdout
    assert out.startswith("checkpoints EQUAL") and f"  B: {b} [dcp]" in out, out
    assert _run([exe, "compare", "--json", a, b]).stdout.startswith("{")  # Python's
    assert _run([exe, "suite", "--version"]).stdout.startswith("pytest")


def test_downstream_example_runs_from_the_wheel_without_torch(venv, downstream):
    result = subprocess.run([venv, "-m", "pytest", "--strict-markers", "-n", "2", "-rs", "-p", "no:cacheprovider",
                             "-W", "error::pytest.PytestAssertRewriteWarning"],
                            cwd=downstream, capture_output=True, text=True, timeout=300, env=_clean_env())
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 skipped" in out, out
    assert "the engine fixtures requires torch, safetensors: pip install 'pytest-miles[torch]'" in out, out
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in out
    assert "requires hopper (sm_90); found no NVIDIA GPU" in out
    assert "PytestAssertRewriteWarning" not in out and "Traceback" not in out


def test_downstream_example_fails_under_require_gpu_without_torch(venv, downstream):
    result = subprocess.run([venv, "-m", "pytest", "--strict-markers", "-n", "2", "-p", "no:cacheprovider",
                             "--miles-require-gpu"], cwd=downstream, capture_output=True, text=True, timeout=300,
                            env=_clean_env())
    assert result.returncode == 1, result.stdout
    assert "2 errors" in result.stdout and "pip install 'pytest-miles[torch]'" in result.stdout


def test_bundled_suite_runs_from_the_wheel_without_torch_and_without_rewrite_warnings(venv, tmp_path):
    result = subprocess.run([venv.parent / "pytest-miles", "suite", "-q",
                             "-W", "error::pytest.PytestAssertRewriteWarning", "-p", "no:randomly"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "PytestAssertRewriteWarning" not in result.stdout + result.stderr
    assert "pip install 'pytest-miles[torch]'" in result.stdout
