"""nox sessions: tests, lint, determinism. Every session passes session.posargs to its tool."""

from __future__ import annotations

import shutil
import subprocess

import nox

nox.options.reuse_existing_virtualenvs = True


def _nvidia_gpus() -> int:
    """GPUs seen by nvidia-smi (the venv may not exist yet, so no pytest_miles import here)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


nox.options.sessions = ["tests", "lint"] + (["determinism"] if _nvidia_gpus() else [])


@nox.session
def tests(session: nox.Session) -> None:
    """The plugin's own tests."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-n", "2", *session.posargs)


def _oldest_pytest() -> str:
    """The lowest pytest pyproject.toml allows (`pytest>=X`): the other end of the tested range."""
    import re
    import tomllib

    with open("pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return next(m.group(1) for d in deps if (m := re.fullmatch(r"pytest>=([\d.]+)", d.replace(" ", ""))))


# The dependencies a user's resolver picks freely (not pinned in [dev]): what the next upstream
# release can break, as pytest 9.2 did by converting typed ini values itself.
UNPINNED = ("pytest", "pytest-xdist", "pytest-timeout", "psutil", "filelock", "safetensors", "numpy",
            "matplotlib", "nvidia-ml-py")


@nox.session(name="tests-oldest")
def tests_oldest(session: nox.Session) -> None:
    """The plugin's own tests on the oldest pytest the project declares."""
    session.install("-e", ".[dev]")
    session.install(f"pytest=={_oldest_pytest()}")
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session(name="tests-latest")
def tests_latest(session: nox.Session) -> None:
    """The tests on the newest release of every unpinned dependency (run it on a schedule, e.g. nightly)."""
    session.install("-e", ".[dev]")
    session.install("--upgrade", *UNPINNED)
    session.run("python", "-m", "pip", "list", "--format=freeze")
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (line length included) and the floors: import-linter's contracts in pyproject.toml."""
    session.install("ruff", "import-linter")
    session.run("ruff", "check", "pytest_miles", "tests", "benchmarks", "scripts", "examples", "noxfile.py",
                "conftest.py", "setup.py", *session.posargs)
    session.install("-e", ".", "--no-deps")
    session.run("lint-imports")


@nox.session
def determinism(session: nox.Session) -> None:
    """The determinism suite. Without a GPU it says so and runs the CPU part (GPU parts skip)."""
    session.install("-e", ".[dev]")
    if not _nvidia_gpus():
        session.log("no NVIDIA GPU found (nvidia-smi): running the CPU part of the suite on the "
                    "embedded default; GPU checks skip with their reasons")
    session.run("pytest-miles", "suite", *session.posargs)
