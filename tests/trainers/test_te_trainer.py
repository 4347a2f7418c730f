"""The TransformerEngine trainer options on CPU: refused before any rank starts (bad names, the
seed's precision rules against the GPU, TE missing, no CUDA), the recipes map onto megatron-core
0.16.1's TransformerConfig, and the fixture skips with the reason. The runs are tests/gpu/test_gpu_te.py."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from pytest_miles.facts.hardware import parse_override  # noqa: E402
from pytest_miles.trainers.megatron import MegatronTrainer, TrainerError  # noqa: E402
from pytest_miles.trainers.te_model import (  # noqa: E402
    RECIPES,
    PrecisionUnsupported,
    TransformerEngineUnavailable,
    check_te_machine,
    te_importable,
)

TE = dict(transformer_impl="transformer_engine", device="cuda")


@pytest.mark.parametrize("kwargs, message", [
    (dict(transformer_impl="te"), "transformer_impl 'te': expected one of local, transformer_engine"),
    (dict(precision="bf16"), "precision 'bf16': the local layer spec trains in fp32"),
    (dict(attention_backend="fused"), "attention_backend 'fused': a TransformerEngine option"),
    (dict(TE, precision="fp16"), "precision 'fp16': expected one of bf16, fp8_blockwise, mxfp8, nvfp4"),
    (dict(TE, attention_backend="sdpa"), "attention_backend 'sdpa': expected one of unfused, fused, flash, auto"),
])
def test_bad_options_are_named(kwargs, message, tmp_path):
    with pytest.raises(TrainerError) as exc:
        MegatronTrainer(log_dir=tmp_path, hardware=parse_override("h100"), **kwargs)
    assert message in str(exc.value)


@pytest.mark.parametrize("precision, gpu, found", [
    ("mxfp8", "h100", "mxfp8 needs blackwell (B200/B300/GB200/GB300); found 1 x NVIDIA H100"),
    ("fp8_blockwise", "a100", "fp8_blockwise needs hopper (H100/H200) or blackwell"),
    ("nvfp4", "b200", "nvfp4 needs a GPU with the NVFP4 recipe, which is still in development on blackwell"),
])
def test_precision_the_gpu_cannot_run_is_refused_naming_it(precision, gpu, found, tmp_path):
    with pytest.raises(PrecisionUnsupported) as exc:
        MegatronTrainer(log_dir=tmp_path, precision=precision, hardware=parse_override(gpu), **TE)
    assert found in str(exc.value)


@pytest.mark.skipif(te_importable(), reason="not applicable: transformer_engine is importable here")
def test_missing_transformer_engine_names_the_package_and_the_install_step(tmp_path):
    for precision in ("bf16", "fp8_blockwise"):
        with pytest.raises(TransformerEngineUnavailable) as exc:
            MegatronTrainer(log_dir=tmp_path, precision=precision, hardware=parse_override("h100"), **TE)
        assert "needs the transformer_engine package" in str(exc.value)
        assert "pip install 'transformer_engine[pytorch]==2.17.1'" in str(exc.value)


def test_defaults():
    from pytest_miles.trainers.config import TrainerConfig

    local = TrainerConfig()
    assert (local.resolved_precision, local.resolved_attention_backend) == ("fp32", None)
    te = TrainerConfig(transformer_impl="transformer_engine", device="cuda")
    assert (te.resolved_precision, te.resolved_attention_backend) == ("bf16", "unfused")
    check_te_machine("local", "fp32", "cpu")  # the local spec needs nothing of the machine
    if te_importable():
        check_te_machine("transformer_engine", "bf16", "cuda", parse_override("h100"))


def test_recipes_are_megatron_core_transformer_config_fields():
    """megatron-core 0.16.1 spells the recipes fp8='e4m3' + Fp8Recipe, fp4='e2m1' + Fp4Recipe."""
    import dataclasses
    import typing

    from megatron.core.enums import Fp4Recipe, Fp8Recipe
    from megatron.core.transformer.transformer_config import TransformerConfig

    hints = typing.get_type_hints(TransformerConfig)
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    for precision, fields in RECIPES.items():
        for name, value in fields.items():
            assert name in names, (precision, name)
            assert value in typing.get_args(typing.get_args(hints[name])[0]), (precision, name, hints[name])
    assert Fp8Recipe(RECIPES["fp8_blockwise"]["fp8_recipe"]) and Fp8Recipe(RECIPES["mxfp8"]["fp8_recipe"])
    assert Fp4Recipe(RECIPES["nvfp4"]["fp4_recipe"])


@pytest.mark.skipif(te_importable(), reason="not applicable: transformer_engine is importable here")
def test_fixture_skips_with_the_reason(pytester):
    pytester.makepyfile("""
        def test_te(megatron_trainer_factory):
            megatron_trainer_factory(transformer_impl="transformer_engine", precision="fp8_blockwise")

        def test_mxfp8_on_hopper(megatron_trainer_factory):
            megatron_trainer_factory(transformer_impl="transformer_engine", precision="mxfp8")
    """)
    result = pytester.runpytest("--miles-gpu-class=h100", "-rs", "-p", "no:randomly")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*needs the transformer_engine package*install*",
                                 "*mxfp8 needs blackwell*found 1 x NVIDIA H100*"])


@pytest.mark.parametrize("precision", list(RECIPES))
def test_te_config_from_the_trainers_config(precision):
    """What a rank trains with: the local config's shape and determinism, bf16 params, the recipe."""
    import torch
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    from pytest_miles.trainers.te_model import te_config

    local = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=128, use_cpu_initialization=True, deterministic_mode=True,
                              params_dtype=torch.float32)
    cfg = te_config(local, {"precision": precision, "attention_backend": "unfused"})
    assert (cfg.num_query_groups, cfg.ffn_hidden_size, cfg.deterministic_mode) == (2, 128, True)
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16 and cfg.attention_backend == AttnBackend.unfused
    assert {k: str(getattr(cfg, k).value if hasattr(getattr(cfg, k), "value") else getattr(cfg, k))
            for k in RECIPES[precision]} == RECIPES[precision]
    assert (cfg.fp8 is None) == ("fp8" not in RECIPES[precision])
    assert (cfg.fp4 is None) == ("fp4" not in RECIPES[precision])


def test_fp8_blockwise_ranks_get_fp32_scales(monkeypatch):
    """Seed 004: Miles' actor env sets NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1 (FP32 block scales, as
    the FP8 checkpoint has); a value the user exported wins."""
    from pytest_miles.trainers.te_model import rank_env

    monkeypatch.delenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", raising=False)
    assert rank_env("fp8_blockwise") == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1"}
    assert rank_env("bf16") == {} and rank_env("fp32") == {}
    monkeypatch.setenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0")
    assert rank_env("fp8_blockwise") == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "0"}
    trainer = MegatronTrainer(transformer_impl="local")
    assert "NVTE_FP8_BLOCK_SCALING_FP32_SCALES" not in trainer.extra_env


def test_te_config_of_a_moe_model_and_its_batch_width():
    """A mixture-of-experts rank on the TE path: the experts as TEGroupedMLP unless the model says
    otherwise (the spec itself needs TE: checked on the GPU); a quantized rank pads its batch width."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from pytest_miles.trainers.config import ModelArgs, TrainerConfig
    from pytest_miles.trainers.megatron_session import batch_width
    from pytest_miles.trainers.moe_router import moe_config_fields
    from pytest_miles.trainers.te_model import te_config

    m = ModelArgs.of_shape("tiny-moe")
    assert m.moe_grouped_gemm and TrainerConfig(model=m, transformer_impl="transformer_engine",
                                                precision="fp8_blockwise").resolved_precision == "fp8_blockwise"
    local = TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=2, num_query_groups=1,
                              ffn_hidden_size=64, use_cpu_initialization=True, params_dtype=torch.float32,
                              **moe_config_fields({"num_moe_experts": 8, "moe_router_topk": 2, "qk_layernorm": True}))
    cfg = te_config(local, {"precision": "bf16", "moe_grouped_gemm": True})
    assert cfg.moe_grouped_gemm and cfg.num_moe_experts == 8 and cfg.bf16 and cfg.moe_router_dtype == "fp32"
    samples = [{"tokens": [1] * 21}, {"tokens": [2] * 5}]
    assert batch_width({"transformer_impl": "transformer_engine", "precision": "fp8_blockwise"}, samples) == 32
    assert batch_width({"transformer_impl": "transformer_engine", "precision": "bf16"}, samples) == 21
    assert batch_width({"transformer_impl": "local", "precision": "fp32"}, samples) == 21
