"""Issue #16 on the H100: the weights SGLang serves are the ones the trainer holds, read back through
SGLang's own /get_weights_by_name (`assert_served_weights_equal`), bitwise:
- the tiny128 bf16 checkpoint, served by SGLang, equals the checkpoint and a megatron-core trainer
  session's own state dict (TE bf16 where TransformerEngine is importable, else the local spec)
  after loading the same checkpoint;
- the block-wise FP8 checkpoint, served with SGLang's FP8 kernels, equals the checkpoint as written
  (the served weights are the quantized float8_e4m3fn ones; scales are not compared).

SGLang's Qwen2ForCausalLM may not implement get_weights_by_name (model_runner.py's TODO "Add
support for Qwen models"; sgl-project/sglang#5066, closed inactive): where every name of a Qwen2
model answers "Get parameter by name failed", the test xfails naming that, and the `llama` variant
serves the very same tensors through SGLang's LlamaForCausalLM (which implements it; it holds no
q/k/v bias, so those three are not read there) so the read-back still runs. Run:
`scripts/gpu-host.sh served-weights` (bf16, ~5 min) and `served-weights-fp8-inline` (~5 min: DeepGEMM's
start-up precompile is off, engines/base.py SGLANG_START_ENV); H100 record in docs/validation/precision.md.
"""

from __future__ import annotations

import json

import pytest

from pytest_miles import assert_served_weights_equal

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1500)]
# Serve the Qwen2 checkpoint through SGLang's Llama class: same tensor names, no q/k/v bias (its
# loader skips a checkpoint bias the model has no parameter for; `attention_bias` would add an
# o_proj bias the checkpoint lacks, left uninitialized): every tensor but the q/k/v biases is read.
AS_LLAMA = ("--json-model-override-args", json.dumps({"architectures": ["LlamaForCausalLM"]}))
ARCHS = {"qwen2": (), "llama": AS_LLAMA}


def _names(arch: str, weights) -> list[str] | None:
    if arch == "qwen2":
        return None  # every tensor (scales excepted)
    return [k for k in sorted(weights) if not k.endswith(("_proj.bias", "_scale_inv"))]


def _check(engine, expected, arch, **kw):
    """assert_served_weights_equal, xfailing (named) where SGLang's Qwen2 class has no
    get_weights_by_name at all: then even `model.norm.weight`, which every Qwen2 has, fails."""
    from pytest_miles.engines.base import WeightNotServed

    try:
        return assert_served_weights_equal(engine, expected, **kw)
    except AssertionError as exc:
        if arch != "qwen2" or not isinstance(exc.__cause__, WeightNotServed):
            raise
        try:
            engine.get_weights_by_name("model.norm.weight", 1)
        except WeightNotServed:
            pytest.xfail("SGLang's Qwen2ForCausalLM answers 'Get parameter by name failed' for every name, "
                         "model.norm.weight included: it has no get_weights_by_name (model_runner.py TODO 'Add "
                         f"support for Qwen models'; sgl-project/sglang#5066). {exc}")
        raise


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sglang_serves_the_bf16_checkpoint_and_the_trainers_weights(arch, engine_factory, megatron_trainer_factory,
                                                                    tmp_path, miles_record):
    from dataclasses import asdict

    from safetensors.torch import load_file

    from pytest_miles.models.embedded import write_hf_checkpoint
    from pytest_miles.models.quantized_checkpoints import TINY128
    from pytest_miles.trainers.megatron import ModelArgs
    from pytest_miles.trainers.te_model import te_importable

    bf16_dir = write_hf_checkpoint(tmp_path / "bf16", TINY128, dtype="bfloat16")
    engine = engine_factory("sglang", model=str(bf16_dir), extra_args=ARCHS[arch])
    hf = load_file(str(bf16_dir / "model.safetensors"))
    report = _check(engine, bf16_dir, arch, names=_names(arch, hf))
    print(f"\n{arch}: {report.render()}")
    impl = "transformer_engine" if te_importable() else "local"
    trainer = megatron_trainer_factory(seed=1, model=ModelArgs.qwen2(TINY128, seq_length=64),
                                       transformer_impl=impl, **({"precision": "bf16"} if impl != "local" else {}))
    with trainer.session(init_hf=bf16_dir, hf_config=asdict(TINY128)) as session:
        state = load_file(str(session.export_state(tmp_path / "trainer.safetensors")))
    spec = "te" if impl == "transformer_engine" else "local"
    trained = _check(engine, state, arch, config=TINY128, spec=spec, names=_names(arch, hf))
    print(f"{arch} vs the {impl} trainer ({next(iter(state.values())).dtype}): {trained.render()}")
    miles_record(f"served weights == checkpoint and {impl} trainer (SGLang {arch} class, bf16)",
                 tensors=trained.tensors, elements=trained.elements)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sglang_serves_the_fp8_checkpoint_as_written(arch, engine_factory, tmp_path, miles_record):
    from safetensors.torch import load_file

    from pytest_miles.models.quantized_checkpoints import write_quantized_checkpoint

    fp8_dir = write_quantized_checkpoint(tmp_path / "fp8", "fp8_blockwise")
    engine = engine_factory("sglang", model=str(fp8_dir), extra_args=ARCHS[arch])
    report = _check(engine, fp8_dir, arch, names=_names(arch, load_file(str(fp8_dir / "model.safetensors"))))
    print(f"\n{arch} FP8: {report.render()}")
    assert arch != "qwen2" or all(n.endswith("_scale_inv") for n, _ in report.not_compared)
    miles_record(f"served weights == the FP8 block-wise checkpoint as written (SGLang {arch} class)",
                 tensors=report.tensors, elements=report.elements)
