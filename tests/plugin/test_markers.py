"""GPU-class markers as users meet them: registration, selection, skip reasons, --miles-require-gpu."""

from __future__ import annotations

import pytest

SAMPLE = """
import pytest

@pytest.mark.{marker}
def test_sample():
    pass
"""

CASES = [
    # override, marker, outcome, reason fragment
    ("a100", "hopper", "skipped", "requires hopper (sm_90); found 1 x NVIDIA A100 (sm_80)"),
    ("h100", "hopper", "passed", None),
    ("h200", "hopper", "passed", None),
    ("none", "hopper", "skipped", "requires hopper (sm_90); found no NVIDIA GPU"),
    ("h100", "blackwell", "skipped", "requires blackwell (sm_100/sm_103); found 1 x NVIDIA H100 80GB HBM3 (sm_90)"),
    ("b200", "blackwell", "passed", None),
    ("b300", "blackwell", "passed", None),
    ("gb200", "blackwell", "passed", None),
    ("rtx5090", "blackwell", "skipped",
     "requires blackwell (sm_100/sm_103); found 1 x NVIDIA GeForce RTX 5090 (sm_120)"),
    ("rtx5090", "blackwell_consumer", "passed", None),
    ("a100", "ampere", "passed", None),
    ("l40s", "ampere", "passed", None),
    ("hopper", "ampere", "skipped", "requires ampere (sm_80/sm_86/sm_89); found 1 x NVIDIA H100 80GB HBM3 (sm_90)"),
    ("none", "gpu", "skipped", "requires an NVIDIA GPU; found no NVIDIA GPU"),
    ("mi300x", "gpu", "skipped", "requires an NVIDIA GPU; found no NVIDIA GPU (1 x AMD Instinct MI300X (gfx 9.4))"),
    ("a100", "gpu", "passed", None),
    ("h100x8", "gpus(8)", "passed", None),
    ("h100x4", "gpus(8)", "skipped", "requires 8 NVIDIA GPUs; found 4 x NVIDIA H100 80GB HBM3 (sm_90)"),
    ("h200", "min_gpu_memory(100)", "passed", None),
    ("h100", "min_gpu_memory(100)", "skipped",
     "requires an NVIDIA GPU with >= 100 GiB; found 1 x NVIDIA H100 80GB HBM3 (sm_90)"),
]


@pytest.mark.parametrize("override,marker,outcome,reason", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_marker_against_forced_gpu(pytester, override, marker, outcome, reason):
    pytester.makepyfile(SAMPLE.format(marker=marker))
    result = pytester.runpytest("--strict-markers", "-rs", f"--miles-gpu-class={override}")
    result.assert_outcomes(**{outcome: 1})
    if reason:
        result.stdout.fnmatch_lines([f"SKIPPED * {reason}"])
        assert "plugin.py" not in result.stdout.str(), "skip must be reported at the test's location"


def test_every_marker_registered_under_strict_markers(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.gpu
        @pytest.mark.gpus(2)
        @pytest.mark.min_gpu_memory(40)
        @pytest.mark.ampere
        @pytest.mark.hopper
        @pytest.mark.blackwell
        @pytest.mark.blackwell_consumer
        def test_all():
            pass

        def test_plain():
            pass
    """)
    result = pytester.runpytest("--strict-markers", "--miles-gpu-class=none")
    result.assert_outcomes(passed=1, skipped=1)
    markers = pytester.runpytest("--markers").stdout.str()
    for name in ("gpu:", "gpus(n):", "min_gpu_memory(gib):", "ampere:", "hopper:", "blackwell:"):
        assert f"@pytest.mark.{name}" in markers
    assert "sm_120" in markers and "NOT included" in markers


def test_class_markers_combine_as_either(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.hopper
        @pytest.mark.blackwell
        def test_either():
            pass
    """)
    pytester.runpytest("--miles-gpu-class=b200").assert_outcomes(passed=1)
    result = pytester.runpytest("-rs", "--miles-gpu-class=a100")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*requires hopper (sm_90) or blackwell (sm_100/sm_103); found 1 x NVIDIA A100*"])


def test_dash_m_selects_marked_tests(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.hopper
        def test_on_hopper():
            pass

        @pytest.mark.blackwell
        def test_on_blackwell():
            pass

        def test_anywhere():
            pass
    """)
    result = pytester.runpytest("-m", "hopper", "-v", "--miles-gpu-class=h100")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(["*test_on_hopper PASSED*"])
    result = pytester.runpytest("-m", "blackwell", "-rs", "--miles-gpu-class=h100")
    result.assert_outcomes(skipped=1, deselected=2)


def test_require_gpu_fails_instead_of_skipping(pytester):
    pytester.makepyfile(SAMPLE.format(marker="hopper"))
    result = pytester.runpytest("--miles-gpu-class=a100", "--miles-require-gpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*requires hopper (sm_90); found 1 x NVIDIA A100 (sm_80)*--miles-require-gpu*"])


def test_require_gpu_from_ini_and_env(pytester, monkeypatch):
    pytester.makepyfile(SAMPLE.format(marker="gpu"))
    pytester.makeini("[pytest]\nmiles_require_gpu = true\nmiles_gpu_class = none\n")
    pytester.runpytest().assert_outcomes(errors=1)
    monkeypatch.setenv("PYTEST_MILES_REQUIRE_GPU", "0")
    pytester.runpytest().assert_outcomes(skipped=1)


def test_override_precedence_cli_over_env_over_ini(pytester, monkeypatch):
    pytester.makepyfile(SAMPLE.format(marker="hopper"))
    pytester.makeini("[pytest]\nmiles_gpu_class = a100\n")
    pytester.runpytest().assert_outcomes(skipped=1)  # ini: a100
    monkeypatch.setenv("PYTEST_MILES_GPU_CLASS", "h100")
    pytester.runpytest().assert_outcomes(passed=1)  # env beats ini
    pytester.runpytest("--miles-gpu-class=none").assert_outcomes(skipped=1)  # CLI beats env


@pytest.mark.parametrize("args,ini,message", [
    (["--miles-gpu-class=tpu9"], "", "--miles-gpu-class: GPU class override 'tpu9': unknown 'tpu9'"),
    ([], "miles_gpu_class = h100x\n", "GPU class override 'h100x': unknown 'h100x'"),
    ([], "miles_require_gpu = maybe\n", "tox.ini: 'maybe' is not a boolean"),
    (["--miles-engine=vllm"], "",
     "option --miles-engine: 'vllm' is not one of reference, reference-server, sglang, sglang-offline"),
])
def test_bad_settings_are_usage_errors(pytester, args, ini, message):
    pytester.makepyfile("def test_x(): pass")
    if ini:
        pytester.makeini("[pytest]\n" + ini)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_bad_marker_arguments_name_the_test(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.gpus(0)
        def test_zero():
            pass
    """)
    result = pytester.runpytest("--miles-gpu-class=h100")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_zero*gpus(0)*positive integer*"])


@pytest.mark.parametrize("ini", ["strict_markers = true\n", "addopts = --strict-markers\nstrict_markers = true\n"])
def test_strict_markers_ini_key_catches_a_typo_on_this_pytest(pytester, ini):
    """The ini key works on every supported pytest: native from 9.0 (where `--strict-markers` in
    addopts is ignored, pytest-dev/pytest#14442), given to pytest 8 by the plugin, with no
    'Unknown config option' warning there."""
    pytester.makeini("[pytest]\n" + ini)
    pytester.makepyfile(SAMPLE.format(marker="hoper"))
    result = pytester.runpytest_subprocess("-W", "error::pytest.PytestConfigWarning")
    result.stdout.fnmatch_lines(["*'hoper' not found in `markers` configuration option*"])
    assert "Unknown config option" not in result.stdout.str() + result.stderr.str()


def test_strict_markers_false_leaves_typos_as_warnings(pytester):
    pytester.makeini("[pytest]\nstrict_markers = false\n")
    pytester.makepyfile(SAMPLE.format(marker="hoper"))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PytestUnknownMarkWarning*hoper*"])
