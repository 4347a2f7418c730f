"""The fingerprint, and the promise that loading the plugin imports no heavy stack."""

from __future__ import annotations

import json
import subprocess
import sys

from pytest_miles.facts.fingerprint import collect, installed_versions
from pytest_miles.facts.hardware import Hardware, _visible_filter, discover, parse_override

HEAVY = ("torch", "sglang", "megatron", "ray", "numpy", "safetensors")


def test_plugin_import_leaves_heavy_stacks_out():
    code = ("import sys, pytest_miles, pytest_miles.plugin; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_whole_session_with_header_imports_no_torch(pytester):
    pytester.makepyfile(f"""
        import sys

        def test_nothing_heavy_loaded(miles_fingerprint, miles_hardware):
            assert miles_fingerprint.digest
            loaded = [m for m in {HEAVY!r} if m in sys.modules]
            assert loaded == []
    """)
    result = pytester.runpytest_subprocess("--miles-gpu-class=h100x2")
    result.assert_outcomes(passed=1)


def test_fingerprint_fields_and_digest(monkeypatch):
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    fp = collect(parse_override("h100x2"))
    data = fp.to_json()
    assert data["gpu_name"] == "NVIDIA H100 80GB HBM3" and data["gpu_capability"] == "sm_90"
    assert data["gpu_count"] == 2 and data["env"]["NCCL_ALGO"] == "Ring"
    assert set(data["packages"]) >= {"torch", "sglang", "megatron-core", "transformer-engine", "ray",
                                     "flashinfer-python", "sglang-kernel", "sgl-kernel"}
    json.dumps(data)
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    assert collect(parse_override("h100x2")).digest != fp.digest, "env vars decide bitwise results"
    assert collect(parse_override("h100x2")).python == fp.python


def test_installed_versions_reads_metadata():
    import importlib.metadata

    versions = installed_versions(("pytest", "surely-not-installed-pkg"))
    assert versions["pytest"] == importlib.metadata.version("pytest")
    assert versions["surely-not-installed-pkg"] is None


def test_cuda_visible_devices_filters_and_renumbers():
    gpus = list(parse_override("h100x4").gpus)
    gpus = [g.__class__(g.index, g.name, g.capability, g.memory_gib, g.vendor, f"GPU-{g.index}abc")
            for g in gpus]
    assert [g.uuid for g in _visible_filter(gpus, {"CUDA_VISIBLE_DEVICES": "2,0"})] == ["GPU-2abc", "GPU-0abc"]
    assert [g.index for g in _visible_filter(gpus, {"CUDA_VISIBLE_DEVICES": "2,0"})] == [0, 1]
    assert _visible_filter(gpus, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert _visible_filter(gpus, {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert len(_visible_filter(gpus, {"CUDA_VISIBLE_DEVICES": "1,-1,2"})) == 1  # CUDA stops at -1
    assert [g.uuid for g in _visible_filter(gpus, {"CUDA_VISIBLE_DEVICES": "GPU-3"})] == ["GPU-3abc"]
    assert len(_visible_filter(gpus, {})) == 4


def test_discovery_on_this_machine_never_raises():
    hw = discover()
    assert isinstance(hw, Hardware)
    assert hw.describe()


def test_cli_fingerprint_json():
    out = subprocess.run([sys.executable, "-m", "pytest_miles.cli", "fingerprint", "--json", "--gpu-class", "b200"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["gpu_capability"] == "sm_100" and len(data["digest"]) == 16
