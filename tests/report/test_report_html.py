"""The HTML report, opened in a real headless browser (Debian's `chromium`): the screenshot is a
non-empty image and the page names every check. Without chromium this test fails (it does not
pass silently): .ci/run installs it when missing; PYTEST_MILES_SKIP_BROWSER=1 turns the failure
into a skip on a machine where installing it is not wanted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

TESTS = """
import pytest
from pytest_miles.report.plot import plot_deviation

@pytest.mark.parametrize("cell", ["rollout=bf16-train=bf16", "rollout=fp8_blockwise-train=bf16"])
def test_cell(miles_record, cell):
    miles_record(f"precision {cell}", train_rollout_logprob_abs_diff=0.0 if "fp8" not in cell else 0.0123)

def test_negative(miles_record, miles_artefact_dir):
    png = plot_deviation({1: 0.0, 2: 0.01, 4: 0.03}, miles_artefact_dir / "nc.png", "negative control [single]")
    miles_record("negative control [single] on fake engine (determinism off)", plot=str(png))

@pytest.mark.hopper
def test_needs_hopper(engine):
    pass
"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = ("chromium is not installed (Debian: apt-get install -y chromium); .ci/run installs it. "
               "PYTEST_MILES_SKIP_BROWSER=1 skips this test instead")
        if os.environ.get("PYTEST_MILES_SKIP_BROWSER"):
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)
    return exe


def _browser(exe: str, profile, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=90)


def test_html_report_opens_in_headless_chromium(pytester, tmp_path):
    pytest.importorskip("matplotlib")
    exe = _chromium()
    pytester.makepyfile(TESTS)
    html, js = tmp_path / "report" / "miles.html", tmp_path / "report" / "miles.json"
    result = pytester.runpytest_subprocess("--miles-gpu-class=none", f"--miles-report-html={html}",
                                           f"--miles-report={js}")
    result.assert_outcomes(passed=3, skipped=1)
    text = html.read_text()
    assert text.count("data:image/png;base64,") == 2  # heatmap + the negative control, embedded
    assert "src='http" not in text and 'src="http' not in text  # self-contained
    shot = tmp_path / "shot.png"
    run = _browser(exe, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2400", html.as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = _browser(exe, tmp_path / "profile", "--dump-dom", html.as_uri()).stdout
    checks = [c["check"] for c in json.loads(js.read_text())["checks"]]
    assert len(checks) == 4
    for name in checks:
        assert name in dom, f"{name!r} is not on the page"
    assert "requires hopper (sm_90)" in dom and "4 determinism checks" in dom
