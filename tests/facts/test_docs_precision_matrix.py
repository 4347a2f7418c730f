"""docs/precision-matrix.md says only what exists: its test file runs as written (here on CPU: the
refused cells pass, the runnable ones skip with their reason, the heatmap is written), its
one-liner prints the derived Megatron args, and every --miles option and gpu-host.sh step it
names is real."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # imported before pytester snapshots sys.modules (a second torch import crashes)
from pytest_miles.models.embedded import write_shape  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "precision-matrix.md").read_text()


def _block_after(marker: str) -> str:
    rest = DOC[DOC.index(marker):]
    return re.search(r"```python\n(.*?)```", rest, re.S).group(1)


def test_the_documented_test_file_runs_on_your_model(pytester, tmp_path):
    model = write_shape(tmp_path / "my-qwen2", "tiny128")
    pytester.makepyfile(test_precision_matrix=_block_after("<!-- docs-check"))
    report = tmp_path / "out" / "precision-report.json"
    res = pytester.runpytest_subprocess("-p", "no:randomly", "-rs", "--miles-model", str(model),
                                        "--miles-report", str(report))
    outcomes = res.parseoutcomes()
    assert outcomes.get("passed", 0) >= 12 and not outcomes.get("failed") and not outcomes.get("errors"), outcomes
    if outcomes.get("skipped"):  # no GPU / no SGLang here: each skip names why
        res.stdout.re_match_lines(
            [r"SKIPPED .*(needs (hopper|blackwell)|requires (sglang|an NVIDIA GPU)|TransformerEngine)"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert report.with_suffix(".precision-matrix.png").is_file()


def test_the_documented_one_liner_prints_the_megatron_args(tmp_path):
    model = write_shape(tmp_path / "my-qwen2", "tiny128", dtype="float32")
    line = next(ln for ln in DOC.splitlines() if ln.startswith('python -c "') and "ModelArgs.qwen2" in ln)
    code = line[len('python -c "'):-1].replace("/path/to/your-qwen2-hf-dir", str(model))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "num_layers=2, hidden_size=256" in out.stdout and "kv_channels=128" in out.stdout, out.stdout


def test_every_option_step_and_test_it_names_exists():
    from pytest_miles.config.settings import SETTINGS

    flags = {s.cli for s in SETTINGS}
    named = set(re.findall(r"--miles-[a-z-]+", DOC))
    assert named and named <= flags, named - flags
    steps = set(re.findall(r"^    ([a-z0-9.-]+)\)", (ROOT / "scripts" / "gpu-host.sh").read_text(), re.M))
    for step in ("te-cells", "te-cells-0.5b", "te-cells-model", "served-weights", "served-weights-fp8",
                 "served-weights-wait"):
        assert f"`{step}`" in DOC and step in steps, step
    gpu_tests = (ROOT / "tests" / "gpu" / "test_gpu_te.py").read_text()
    assert "def test_cell_end_to_end(" in gpu_tests and "def test_cell_end_to_end_on_miles_model(" in gpu_tests
