"""The GPU parity test's plan, without a GPU: the cells, their keys and trainer options, the order
that starts each engine configuration once, the FP8 padding of measure_parity, and the RL loop's
configuration as tests take it (LoopFactory.setup, rollout_batch)."""

from __future__ import annotations

import pytest

from pytest_miles.errors import InputError
from pytest_miles.scenarios.parity import pad_samples, trim_scored
from pytest_miles.scenarios.parity_cells import CELLS, PLANTED, by_serving, cell, engine_starts, schedule


def test_cells_keys_and_trainer_options():
    c = cell("qwen2.5-0.5b:bf16:bf16")
    assert c.id == "qwen2.5-0.5b-bf16-x-bf16" and c.serving == ("qwen2.5-0.5b", "bf16") and c.needs_te
    kw = c.trainer_kwargs()
    assert kw["transformer_impl"] == "transformer_engine" and kw["precision"] == "bf16"
    assert kw["model"].hidden_size == 896 and kw["model"].num_layers == 24 and kw["model"].tie_embeddings
    assert c.budget_key("flashinfer") == {"model": "qwen2.5-0.5b", "rollout": "bf16", "train": "bf16",
                                          "backend": "flashinfer", "tp": 1}
    local = cell("tiny128:bf16:fp32")
    assert not local.needs_te and "transformer_impl" not in local.trainer_kwargs() and local.pad_multiple is None
    assert cell("tiny128:fp8_blockwise:fp8_blockwise").pad_multiple == 16
    assert {x.id for x in CELLS} >= {"tiny128-bf16-x-bf16", "qwen2.5-0.5b-bf16-x-bf16", "tiny128-fp8_blockwise-x-bf16",
                                     "tiny128-fp8_blockwise-x-fp8_blockwise"}


@pytest.mark.parametrize(("name", "named"), [
    ("tiny128:bf16", "shape:rollout:train"),
    ("huge:bf16:bf16", "shape='huge'"),
    ("tiny128:int4:bf16", "rollout='int4'"),
    ("tiny128:bf16:fp16", "train='fp16'"),
    ("tiny:fp8_blockwise:bf16", "multiple of 128"),  # the default tiny shape's KV projection is 64 wide
])
def test_bad_cells_named(name, named):
    with pytest.raises(InputError, match=named.replace("(", r"\(").replace("[", r"\[")):
        cell(name)


def test_schedule_starts_each_engine_configuration_once():
    mixed = [cell("tiny128:bf16:fp32"), cell("tiny128:fp8_blockwise:bf16"), cell("tiny128:bf16:bf16")]
    assert [c.id for c in by_serving(mixed)] == ["tiny128-bf16-x-fp32", "tiny128-bf16-x-bf16",
                                                  "tiny128-fp8_blockwise-x-bf16"]
    plan = schedule(CELLS)
    servings = {c.serving for c in CELLS}
    assert engine_starts(plan) == 2 * len(servings)  # a production and a tensor-dump engine each
    assert [p for c, p in plan if c == PLANTED] == ["parity", "locate", "planted"]
    assert len(plan) == 2 * len(CELLS) + 1
    # what one parametrized test per phase gives (the planted control last): the tiny128 dump engine twice
    naive = [(c, p) for p in ("parity", "locate") for c in CELLS] + [(PLANTED, "planted")]
    assert engine_starts(naive) == engine_starts(plan) + 1


def test_pad_and_trim_round_trip():
    samples = [{"tokens": [5, 6, 7, 8, 9], "prompt_len": 2}, {"tokens": list(range(3, 21)), "prompt_len": 4}]
    padded = pad_samples(samples, 16)
    assert [len(s["tokens"]) for s in padded] == [32, 32] and padded[0]["tokens"][:5] == [5, 6, 7, 8, 9]
    assert pad_samples(samples, None) is samples
    got = {"logprobs": [[-1.0] * 30, [-2.0] * 28], "targets": [list(range(30)), list(range(28))],
           "positions": [list(range(1, 31)), list(range(3, 31))]}
    cut = trim_scored(got, samples)
    assert [len(r) for r in cut["logprobs"]] == [3, 14] and cut["positions"][0] == [1, 2, 3]
    assert trim_scored({"logprobs": [[-1.0]]}, [{"tokens": [1, 2], "prompt_len": 1}]) == {"logprobs": [[-1.0]]}
    with pytest.raises(InputError, match="pad_multiple"):
        pad_samples(samples, 0)


def test_loop_setup_is_what_the_loop_runs_with(tmp_path):
    from pytest_miles.scenarios.loop.factory import LoopFactory

    loops = LoopFactory(engine_factory=None, make_trainer=None, work_root=tmp_path)
    s = loops.setup("sglang", seed=1234)
    assert s.weights_dtype == "bfloat16" and s.init.name == "init-bfloat16" and (s.init / "config.json").exists()
    assert s.engine == {"model": str(s.init), "deterministic": True}
    assert s.trainer["seed"] == 1234 and s.trainer["deterministic"] and "transformer_impl" not in s.trainer
    m = s.trainer["model"]
    assert (m.hidden_size, m.num_layers, m.kv_channels, m.rotary_interleaved) == (128, 2, 64, False)
    assert s.hf_config["hidden_size"] == 128 and s.shape.vocab_size == 512  # the default tiny shape
    ref = loops.setup("reference-server", engine_deterministic=False)
    assert ref.trainer["model"].rotary_interleaved and ref.engine["threads"] == 1 and not ref.engine["deterministic"]
    assert ref.weights_dtype == "float32"


def test_rollout_batch_from_a_record():
    from pytest_miles.scenarios.loop.run import rollout_batch

    batch, params = rollout_batch([[5, 6], [7]], [[11, 12], [13, 14]], 12)
    assert batch == [[5, 6], [5, 6], [7], [7]]
    assert [p.sampling_seed for p in params] == [11, 12, 13, 14]
    assert {(p.temperature, p.max_new_tokens, p.ignore_eos) for p in params} == {(1.0, 12, True)}
    with pytest.raises(ValueError, match="2 prompts but 1 rows"):
        rollout_batch([[5], [6]], [[1, 2]], 4)


def test_fp8_cell_serves_a_checkpoint_quantized_from_the_trainers_bf16_files(tmp_path):
    import json

    from pytest_miles.scenarios.parity_cells import serve_weights

    bf16, serve = serve_weights(cell("tiny128:fp8_blockwise:bf16"), tmp_path)
    assert bf16 == tmp_path / "tiny128" / "bf16" and serve == tmp_path / "tiny128" / "fp8_blockwise"
    qc = json.loads((serve / "config.json").read_text())["quantization_config"]
    assert qc["weight_block_size"] == [128, 128] and qc["quant_method"] == "fp8"
    assert serve_weights(cell("tiny128:bf16:bf16"), tmp_path) == (bf16, bf16)  # written once, shared
