"""The cross-check with SGLang's test_deterministic: its printed conclusions parsed per mode (the
lines are those of sglang/test/test_deterministic.py, 0.5.17), and what the check refuses. The tool
itself runs on the GPU host (tests/gpu/test_gpu_cache_api.py)."""

from __future__ import annotations

import pytest

from pytest_miles.errors import InputError, NotApplicable
from pytest_miles.scenarios.sglang_tool import CrossCheckReport, parse_tool_output

PREFIX_OK = "\n".join(f"Prompt {i} with prefix length {n}: total samples: 40, Unique samples: 1"
                      for i, n in enumerate((1, 511, 2048, 4097)))


@pytest.mark.parametrize(("mode", "text", "deterministic"), [
    ("single", "Trial 1 with batch size 1: a\nTotal samples: 50, Unique samples: 1", True),
    ("single", "Total samples: 50, Unique samples: 3", False),
    ("prefix", PREFIX_OK, True),
    ("prefix", PREFIX_OK.replace("4097: total samples: 40, Unique samples: 1", "4097: total samples: 40, Unique "
                                 "samples: 2"), False),
    ("radix_cache", "✓✓✓ TEST PASSED - Radix cache is consistent! ✓✓✓", True),
    ("radix_cache", "✗✗✗ TEST FAILED - Radix cache produces different results! ✗✗✗", False),
    ("p_vs_d", "Compare sequence 0 in batch...\n✅ Token match\n✅ Logprobs match: [1]", True),
    ("p_vs_d", "Compare sequence 0 in batch...\n✅ Token match\n❌ Logprobs mismatch", False),
    ("single", "Traceback (most recent call last): ...", None),
])
def test_the_tools_conclusion_is_read_from_its_output(mode, text, deterministic):
    assert parse_tool_output(mode, text).deterministic is deterministic


def test_a_mode_the_tool_does_not_share_is_named():
    with pytest.raises(InputError, match="needle"):
        parse_tool_output("needle", "")


def test_the_report_counts_agreement_and_names_a_disagreement():
    report = CrossCheckReport("sglang", [
        {"tool_mode": "single", "ours_mode": "single", "tool": "deterministic", "ours": "passed", "agree": True},
        {"tool_mode": "p_vs_d", "ours_mode": "p_vs_d", "tool": "deterministic", "ours": "known limitation",
         "agree": False},
        {"tool_mode": "prefix", "ours_mode": "prefix_long_anchor", "tool": "not run", "ours": "not run", "agree": None,
         "why": "the tool's inputs need 4300 positions"}])
    text = report.render()
    assert not report.passed and "1 modes agree, 1 disagree, 1 not comparable" in text and "DISAGREE" in text
    assert "4300 positions" in text


def test_without_sglang_or_a_served_engine_it_says_why(tmp_path):
    import importlib.util

    from pytest_miles.engines.reference import ReferenceEngine
    from pytest_miles.models.embedded import write_hf_checkpoint
    from pytest_miles.scenarios.sglang_tool import cross_check_sglang_tool

    pytest.importorskip("torch")
    model = write_hf_checkpoint(tmp_path / "m")
    with pytest.raises(InputError, match="not a served engine"):
        cross_check_sglang_tool(ReferenceEngine(model), model)
    with pytest.raises(InputError, match="modes"):
        cross_check_sglang_tool(ReferenceEngine(model), model, modes=("needle",))
    if importlib.util.find_spec("sglang") is None:
        from pytest_miles.engines.reference_server_engine import ReferenceServerEngine

        with ReferenceServerEngine(model, log_dir=tmp_path) as server, pytest.raises(NotApplicable, match="sglang"):
            cross_check_sglang_tool(server, model)


def test_ours_runs_in_the_shape_where_the_data_says_the_limitation_shows():
    """The tool's p_vs_d scores long sequences; ours ran at its default (prompts up to 48 tokens) and passed on
    flashinfer where the tool found mismatches (H200, 2026-12-04). A pass outside the limitation's shape says
    nothing about the tool's inputs: our run must reach every p_vs_d cell's reproducing length."""
    from pytest_miles.capabilities import load_capabilities
    from pytest_miles.scenarios.sglang_tool import TOOL_SHAPE

    lengths = [c.reproduces["min_seq_len"] for c in load_capabilities().cells
               if "p_vs_d" in c.modes and c.reproduces and "min_seq_len" in c.reproduces]
    assert lengths, "no p_vs_d cell names the length where it reproduces"
    # p_vs_d draws prompts of 2..prompt_len tokens: most of 8 trials reach the longest length named
    assert TOOL_SHAPE["p_vs_d"]["prompt_len"] >= 4 * max(lengths)
