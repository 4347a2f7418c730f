"""The end-to-end precision cell helper on CPU: the figures from logprob lists, the seed's rules
and the GPU judged before anything starts, the trainer adapter's reason where issue #17's parts
are absent, and the heatmap. The measured cells are tests/gpu/test_gpu_te.py."""

from __future__ import annotations

import math

import pytest

from pytest_miles.checks.drift import DriftReport
from pytest_miles.facts.hardware import parse_override
from pytest_miles.facts.precision import FORMATS, cell_status
from pytest_miles.scenarios.precision_cells import (
    CellNotRunnable,
    CellReport,
    check_cell,
    drift_between,
    heatmap_label,
    measure_precision_cell,
    plot_precision_matrix,
)


def test_figures_over_the_rollout_tokens():
    d = drift_between("fp8_blockwise", "bf16", [[-1.0, -2.0], [-0.5]], [[-1.5, -2.0], [-0.25]])
    assert (d.train_rollout_logprob_abs_diff, d.max_abs_diff, d.tokens) == (0.25, 0.5, 3)
    k3 = [math.expm1(r) - r for r in (-0.5, 0.0, 0.25)]
    assert d.kl == pytest.approx(sum(k3) / 3) and d.kl > 0
    same = drift_between("bf16", "bf16", [[-1.0, -3.0]], [[-1.0, -3.0]])
    assert (same.train_rollout_logprob_abs_diff, same.max_abs_diff, same.kl) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("rollout, train, message", [
    ("bf16", "bf16", "sequence 0: 2 rollout logprobs, 1 from the trainer"),
    ("bf16", "bf16", "1 rollout sequences but 2 scored by the trainer"),
])
def test_mismatched_scores_are_explained(rollout, train, message):
    lt = [[-1.0]] if "sequence 0" in message else [[-1.0, -2.0], [-1.0]]
    with pytest.raises(AssertionError, match=message):
        drift_between(rollout, train, [[-1.0, -2.0]], lt)


def test_verdict_against_the_users_tolerance():
    d = DriftReport("fp8_blockwise", "bf16", 0.02, 0.3, 0.001, 64, "end-to-end")
    assert CellReport(d, 4).verdict == "figure only (no tolerance set)"
    assert CellReport(d, 4, tolerance=0.05).check().verdict == "within tolerance 0.05"
    with pytest.raises(AssertionError, match="above its tolerance: rollout=fp8_blockwise train=bf16"):
        CellReport(d, 4, tolerance=0.01).check()


@pytest.mark.parametrize("rollout", list(FORMATS))
@pytest.mark.parametrize("train", list(FORMATS))
def test_cells_judged_before_anything_starts(rollout, train, tmp_path):
    def never(*args, **kwargs):  # deliberate negative control: nothing may start for these cells
        raise AssertionError("an engine or trainer was started for a cell that must be refused")

    cell = cell_status(rollout, train)
    hopper = parse_override("h100")
    if not cell.valid:
        with pytest.raises(ValueError) as exc:
            measure_precision_cell(cell, never, never, hardware=hopper, work_dir=tmp_path)
        assert str(exc.value) == cell.status
    elif "mxfp8" in cell.formats:
        with pytest.raises(CellNotRunnable, match=r"mxfp8 needs blackwell .*found 1 x NVIDIA H100"):
            measure_precision_cell(cell, never, never, hardware=hopper, work_dir=tmp_path)
        check_cell(rollout, train, parse_override("b200"))
    else:  # the three Hopper cells: runnable here; the FP8 ones not on an A100
        check_cell(rollout, train, hopper)
        if "fp8_blockwise" in cell.formats:
            with pytest.raises(CellNotRunnable, match=r"fp8_blockwise needs hopper .*found 1 x NVIDIA A100"):
                measure_precision_cell(cell, never, never, hardware=parse_override("a100"), work_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "a refused cell wrote weights"


def test_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    d = DriftReport("fp8_blockwise", "bf16", 0.02, 0.3, 0.001, 64, "end-to-end")
    png = plot_precision_matrix({("fp8_blockwise", "bf16"): CellReport(d, 4),
                                 ("mxfp8", "mxfp8"): "mxfp8 needs blackwell"}, tmp_path / "m.png")
    assert png.stat().st_size > 1000
    png = plot_precision_matrix({}, tmp_path / "h100.png", hardware=parse_override("h100"))
    assert png.stat().st_size > 1000


def test_heatmap_labels_say_why_a_cell_has_no_figure():
    """A cell the GPU cannot run and that no test entered (the plugin skipped it before its body)
    says why on the heatmap (H100 record 2026-11-24 showed "not run"); refused cells show "-"."""
    d = DriftReport("bf16", "bf16", 0.0093, 0.037, 8e-5, 82, "end-to-end")
    h100 = parse_override("h100")
    assert heatmap_label("bf16", "bf16", CellReport(d, 4), h100) == "0.0093\n82 tok"
    assert heatmap_label("mxfp8", "mxfp8", None, h100).startswith("skipped\nmxfp8 needs blackwell")
    assert heatmap_label("mxfp8", "mxfp8", None, parse_override("b200")) == "not run"
    assert heatmap_label("mxfp8", "mxfp8", None) == "not run"
    assert heatmap_label("bf16", "fp8_blockwise", None, h100) == "-"  # the seed's rules refuse it
    assert heatmap_label("fp8_blockwise", "bf16", "a reason longer than one line of the cell", h100) == (
        "skipped\na reason longer than\none line of the cell")


def test_trainer_side_names_what_is_not_wired(tmp_path):
    from pytest_miles.scenarios.precision_cells import trainer_logprobs
    from pytest_miles.trainers.megatron import ModelArgs

    if hasattr(ModelArgs, "qwen2"):
        pytest.skip("not applicable: issue #17's trainer session is merged here")
    with pytest.raises(CellNotRunnable, match=r"needs ModelArgs\.qwen2, MegatronTrainer\.session, "
                                              r"pytest_miles\.convert\.hf_to_megatron \(issue #17"):
        trainer_logprobs(None, tmp_path, None, [{"tokens": [5, 6], "prompt_len": 1}], "bf16")

    def never(*args, **kwargs):  # deliberate negative control: nothing may start
        raise AssertionError("an engine or trainer was started although the trainer side is not wired")

    with pytest.raises(CellNotRunnable, match="not applicable here"):
        measure_precision_cell(("bf16", "bf16"), never, never, hardware=parse_override("h100"), work_dir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_trainer_side_scores_the_served_weights_on_cpu(tmp_path):
    """Through issue #17's converter and session, the local-spec fp32 trainer scores the bf16
    checkpoint's response tokens as a plain-torch Qwen2 forward with HF's RoPE (what SGLang
    serves) does: the same weights and the same function on both sides."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from pytest_miles.models.embedded import TinyDecoder, write_hf_checkpoint
    from pytest_miles.models.quantized_checkpoints import TINY128
    from pytest_miles.scenarios.precision_cells import seeded_prompts, trainer_logprobs
    from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs

    if not hasattr(ModelArgs, "qwen2"):
        pytest.skip("not applicable: issue #17's converter and trainer session are not merged here")
    from safetensors.torch import load_file

    class HFRope(TinyDecoder):
        """The embedded decoder with HF Qwen2's rotate-half RoPE (TinyDecoder pairs (2i, 2i+1))."""

        def _rope(self, x, positions):
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
            cos, sin, h = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    hf = write_hf_checkpoint(tmp_path / "bf16", TINY128)
    samples = [{"tokens": p + [7, 8, 9, 10, 11], "prompt_len": len(p)}
               for p in seeded_prompts(2, 6, TINY128.vocab_size, 0)]
    got, facts = trainer_logprobs(lambda **kw: MegatronTrainer(log_dir=tmp_path / "logs", **kw), hf, TINY128,
                                  samples, "fp32")
    assert facts["trainer"] == "megatron-core local fp32"
    dec = HFRope(TINY128, {k: v.float() for k, v in load_file(str(hf / "model.safetensors")).items()})
    for s, row in zip(samples, got):
        ids = torch.tensor([s["tokens"]])
        logits, _ = dec.step(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool),
                             all_logits=True)
        logp = torch.log_softmax(logits[0], -1)
        ref = [logp[t - 1, s["tokens"][t]].item() for t in range(s["prompt_len"], len(s["tokens"]))]
        assert len(row) == len(ref) == 5
        assert max(abs(a - b) for a, b in zip(row, ref)) < 1e-4, (row, ref)


@pytest.mark.parametrize("cell", ["x", None, ("bf16",), ("bf16", 8), ["bf16", "bf16", "bf16"]])
def test_a_cell_that_is_not_a_cell_is_named(cell, tmp_path):
    with pytest.raises(ValueError, match=r"cell .*: expected a precision.Cell"):
        measure_precision_cell(cell, None, None, hardware=None, work_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_your_own_model_dir_is_checked_before_anything_starts(tmp_path):
    """`model_dir=` (the user's HF checkpoint, `--miles-model`): what does not fit the Qwen2
    converter is named before an engine or trainer starts and before anything is written."""
    import json

    def never(*args, **kwargs):  # deliberate negative control: nothing may start for these dirs
        raise AssertionError("an engine or trainer was started for a model_dir that must be refused")

    work = tmp_path / "work"
    hopper = parse_override("h100")
    cases = {"empty": ({}, None, "no config.json"),
             "llama": ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, b"x", "is not a Qwen2 model"),
             "fp8": ({"model_type": "qwen2", "quantization_config": {"quant_method": "fp8"}}, b"x", "a quantized"),
             "bin": ({"model_type": "qwen2"}, None, r"no \*.safetensors")}
    for name, (config, weights, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        if config:
            (d / "config.json").write_text(json.dumps(config))
        if weights:
            (d / "model.safetensors").write_bytes(weights)
        with pytest.raises(ValueError, match=f"model_dir .*{message}"):
            measure_precision_cell(("bf16", "bf16"), never, never, hardware=hopper, work_dir=work, model_dir=d)
    with pytest.raises(ValueError, match="config= and model_dir=: give one"):
        measure_precision_cell(("bf16", "bf16"), never, never, hardware=hopper, work_dir=work, model_dir=tmp_path,
                               config=object())
    assert not work.exists()


def test_your_own_checkpoint_quantized_as_the_embedded_one(tmp_path):
    """quantize_checkpoint_dir (an FP8 rollout of model_dir) writes, from a user's bf16 checkpoint,
    exactly what write_quantized_checkpoint writes from the same weights, in a layout SGLang loads."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from pytest_miles.models.embedded import write_hf_checkpoint
    from pytest_miles.models.quantized_checkpoints import (
        TINY128,
        check_sglang_layout,
        quantize_checkpoint_dir,
        write_quantized_checkpoint,
    )

    mine = write_hf_checkpoint(tmp_path / "mine", TINY128, dtype="bfloat16")
    ours = load_file(str(quantize_checkpoint_dir(mine, tmp_path / "q", "fp8_blockwise") / "model.safetensors"))
    ref = load_file(str(write_quantized_checkpoint(tmp_path / "ref", "fp8_blockwise") / "model.safetensors"))
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)
    assert check_sglang_layout(tmp_path / "q") == []
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint_dir(tmp_path / "q", tmp_path / "qq", "fp8_blockwise")


def test_an_fp8_rollout_of_a_shape_sglang_would_refuse_is_named(tmp_path):
    """The default tiny shape's 64-wide k/v projections do not fit 128-row blocks: refused, naming
    the tensor, before an engine starts."""
    pytest.importorskip("torch")
    from pytest_miles.models.embedded import write_hf_checkpoint

    def never(*args, **kwargs):  # deliberate negative control: no engine may start for this cell
        raise AssertionError("an engine was started for a checkpoint SGLang would refuse")

    mine = write_hf_checkpoint(tmp_path / "tiny", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"multiples of 128; not: model.layers.0.self_attn.k_proj.weight \(64, 128\)"):
        measure_precision_cell(("fp8_blockwise", "bf16"), never, never, hardware=parse_override("h100"),
                               work_dir=tmp_path / "work", model_dir=mine)
    assert not (tmp_path / "work" / "fp8_blockwise").exists()



class _NeverRead:
    """Deliberate negative control: an engine the served-weights check must never get to read."""

    name = "never-read"

    def get_weights_by_name(self, *args):
        raise AssertionError("a weight was read although the expected checkpoint had to be refused")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("content, message, unreadable", [
    (b"{not json", r"config.json: not valid JSON", True),
    (b"[1, 2]", r"config.json: a JSON list, not an object", True),
    (None, r"config.json: cannot be read \(a FIFO", True),
    (b'{"model_type": "qwen2"}', r"config.json: missing field\(s\) vocab_size", False),
])
def test_a_bad_config_json_is_named_and_never_blocks(content, message, unreadable, tmp_path):
    """Every reader of a user's HF dir config.json (the reference engine, `model_dir=`,
    quantize_checkpoint_dir, the served-weights check) goes through read_hf_config: malformed
    JSON, a non-object and a FIFO are named, nothing hangs, the file is left as it was."""
    import os

    from pytest_miles import assert_served_weights_equal
    from pytest_miles.models.embedded import config_from_dir, read_hf_config
    from pytest_miles.models.quantized_checkpoints import quantize_checkpoint_dir

    d = tmp_path / "m"
    d.mkdir()
    cfg = d / "config.json"
    if content is None:
        os.mkfifo(cfg)
    else:
        cfg.write_bytes(content)
    (d / "model.safetensors").write_bytes(b"x")
    before = cfg.stat()
    if unreadable:  # the whole file is refused: every reader says so
        with pytest.raises(ValueError, match=message):
            read_hf_config(d)
        with pytest.raises(ValueError, match=message):
            quantize_checkpoint_dir(d, tmp_path / "q", "fp8_blockwise")
        with pytest.raises(ValueError, match="expected: .*" + message):
            assert_served_weights_equal(_NeverRead(), d)
    with pytest.raises(ValueError, match=message):
        config_from_dir(d)
    with pytest.raises(ValueError, match="model_dir .*" + message):
        measure_precision_cell(("bf16", "bf16"), None, None, hardware=parse_override("h100"), work_dir=tmp_path / "w",
                               model_dir=d)
    after = cfg.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert not (tmp_path / "q").exists() and not (tmp_path / "w").exists()
