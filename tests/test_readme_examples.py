"""Every code block in README.md runs as a user would run it: each ```python block is a test file
of its own in a fresh project (`--strict-markers`, only the imports the block writes itself), and
each ```bash block runs when it is safe on CPU, or names why it does not. GPU tests skip with their
reason through the plugin; the README's first block is examples/downstream's test file, verbatim."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # imported before pytester snapshots sys.modules (a second torch import crashes)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
SLOW_FIXTURES = ("megatron_trainer_factory", "rl_loop_factory", "ray_cluster")

# bash blocks not run here, each with its reason (a new block fails the test until it is run or listed)
NOT_RUN = {
    "pytest-miles suite": "the Quick start commands: .ci/run runs exactly these two",
    "nox -s tests-latest": "installs the newest releases of every dependency: a scheduled CI job",
    "python3 -m pip install \"pytest-miles[torch]": "installs into the current environment",
}
# the commands run here, and the exit status the README promises for each
EXIT = {
    "pytest-miles compare run1/model.pt run2/model.pt": 0,
    "pytest-miles compare run1/model.pt run3/model.pt --json": 1,
    "pytest-miles doctor --gpu-class none": 0,
    "pytest-miles fingerprint --json": 0,
}


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(the heading above the block, the block) for every ```lang block."""
    out = []
    for m in BLOCK.finditer(README):
        if m.group(1) == lang:
            before = BLOCK.sub("", README[:m.start()])  # a `# comment` in a code block is no heading
            heading = re.findall(r"^#+ (.+)$", before, re.M)[-1]
            out.append((heading, m.group(2)))
    return out


PYTHON = _blocks("python")
BASH = _blocks("bash")


def _param(i: int, heading: str, code: str):
    slow = [pytest.mark.slow] if any(f in code for f in SLOW_FIXTURES) or "every mode" in heading else []
    return pytest.param(code, id=f"{i}-{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}", marks=slow)


def _run(pytester: pytest.Pytester, code: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_readme_example=code)
    return pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider", "-p", "no:randomly",
                                         "-rs", *args)


def _assert_ran(result: pytest.RunResult) -> None:
    outcomes = result.parseoutcomes()
    text = result.stdout.str()
    assert not outcomes.get("failed") and not outcomes.get("errors") and not outcomes.get("error"), text[-4000:]
    assert outcomes.get("passed", 0) >= 1, text[-4000:]
    if outcomes.get("skipped"):  # a skip gives its reason: the need that is not met here
        for line in re.findall(r"^SKIPPED .*$", text, re.M):
            assert re.search(r"requires|needs|found|cluster has|not applicable", line), line


def test_there_are_examples_for_every_capability():
    headings = " ".join(h for h, _ in PYTHON).lower()
    for topic in ("batch invariance", "training twice", "checkpoint", "rl loop", "snapshots", "precision", "ray"):
        assert topic in headings, topic


def test_the_first_block_is_the_downstream_example():
    assert PYTHON[0][1] == (ROOT / "examples" / "downstream" / "tests" / "test_determinism.py").read_text()


@pytest.mark.parametrize("code", [_param(i, h, c) for i, (h, c) in enumerate(PYTHON)])
def test_python_block_runs(pytester, code):
    if "determinism_snapshot" in code:  # a user's first run records, the next ones compare
        _assert_ran(_run(pytester, code, "--miles-snapshot-update"))
    _assert_ran(_run(pytester, code))


def test_negative_control_a_block_without_its_import_fails(pytester):
    """NEGATIVE CONTROL: the first block without `import pytest` must not pass, so the runner above
    cannot hide a missing import."""
    code = PYTHON[0][1].replace("import pytest\n", "")
    assert "import pytest" not in code
    result = _run(pytester, code)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*NameError: name 'pytest' is not defined*"])


def _write_saves(where: Path) -> None:
    for run, value in (("run1", 0.5), ("run2", 0.5), ("run3", -0.5)):
        (where / run).mkdir()
        torch.save({"layer.weight": torch.full((4, 4), value)}, where / run / "model.pt")


def test_every_bash_block_runs_or_says_why_not(tmp_path):
    _write_saves(tmp_path)
    ran = []
    for heading, code in BASH:
        reason = next((why for key, why in NOT_RUN.items() if key in code), None)
        lines = [ln.split("#")[0].strip() for ln in code.splitlines() if ln.split("#")[0].strip()]
        if reason:
            continue
        for line in lines:
            assert line in EXIT, f"{heading}: {line!r} is neither run by this test nor listed in NOT_RUN"
            argv = [sys.executable, "-m", "pytest_miles.cli", *shlex.split(line)[1:]]
            out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert out.returncode == EXIT[line], f"{line}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
            ran.append(line)
    assert sorted(ran) == sorted(EXIT), set(EXIT) - set(ran)
