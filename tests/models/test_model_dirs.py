"""A model directory a user hands the reference engine (`--miles-model`, `ReferenceEngine(path)`): a config.json
with a field no model can have, or weights that are not the ones it describes, is one InputError naming the file
and the field, never an error deep in torch ("unsupported operand type(s) for //", "int too big to convert")."""

from __future__ import annotations

import json
import random
import shutil

import pytest

pytest.importorskip("torch")

from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.errors import InputError  # noqa: E402
from pytest_miles.models.embedded import TinyConfig  # noqa: E402
from pytest_miles.models.moe import MoeConfig  # noqa: E402
from pytest_miles.models.shapes import SHAPES, write_shape  # noqa: E402
from tests.helpers.mutate import mutate  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-dirs")
    return {shape: write_shape(root / shape, shape, "float32") for shape in ("tiny", "tiny-moe")}


def _with_config(good, tmp_path, config, name="bad"):
    bad = tmp_path / name
    shutil.copytree(good, bad)
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("field, value, says", [
    ("hidden_size", "128", "'hidden_size': expected an integer in [1, 2147483647], got '128'"),
    ("num_attention_heads", 0, "'num_attention_heads': expected an integer in [1, 2147483647], got 0"),
    ("vocab_size", 2**70, "'vocab_size': expected an integer in [1, 2147483647]"),
    ("num_key_value_heads", 3, "num_attention_heads (2) is not a multiple of num_key_value_heads (3)"),
    ("rope_theta", float("nan"), "'rope_theta': expected a number in (0, 1e+15], got nan"),
    ("rope_theta", 2**70, "'rope_theta': expected a number in (0, 1e+15]"),
    ("rms_norm_eps", -1e-6, "'rms_norm_eps': expected a number in (0, 1], got -1e-06"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings': expected true or false, got 'no'"),
    ("num_hidden_layers", True, "'num_hidden_layers': expected an integer in [1, 2147483647], got True"),
])
def test_a_field_no_model_can_have_is_named(dirs, tmp_path, shape, field, value, says):
    config = json.loads((dirs[shape] / "config.json").read_text())
    bad = _with_config(dirs[shape], tmp_path, {**config, field: value})
    with pytest.raises(InputError) as exc:
        ReferenceEngine(bad)
    assert str(bad / "config.json") in str(exc.value) and says in str(exc.value), str(exc.value)


@pytest.mark.parametrize("shape, field, value, says", [
    ("tiny", "intermediate_size", 512, "model.layers.0.mlp.gate_proj.weight is [256, 128] in the weights, "
     "config.json describes [512, 128]"),
    ("tiny", "num_hidden_layers", 3, "tensor(s) that config.json describes are not in the weights, first "
     "model.layers.2."),
    ("tiny-moe", "num_experts", 16, "not in the weights, first model.layers.0.mlp.experts.8."),
    ("tiny-moe", "vocab_size", 1024, "model.embed_tokens.weight is [512, 128] in the weights, config.json "
     "describes [1024, 128]"),
])
def test_weights_that_are_not_the_ones_config_json_describes_are_named(dirs, tmp_path, shape, field, value, says):
    config = json.loads((dirs[shape] / "config.json").read_text())
    bad = _with_config(dirs[shape], tmp_path, {**config, field: value})
    with pytest.raises(InputError) as exc:
        ReferenceEngine(bad)
    assert str(bad) in str(exc.value) and says in str(exc.value), str(exc.value)


def test_a_weight_update_from_weights_of_another_shape_is_named(dirs, tmp_path):
    """/update_weights_from_disk's equivalent: the same config.json over another model's weights."""
    from pytest_miles.models.embedded import write_hf_checkpoint

    other = write_hf_checkpoint(tmp_path / "other", TinyConfig(intermediate_size=512), dtype="float32")
    shutil.copy(dirs["tiny"] / "config.json", other / "config.json")
    engine = ReferenceEngine(dirs["tiny"])
    with pytest.raises(InputError, match=r"gate_proj.weight is \[512, 128\] in the weights, config.json describes "
                       r"\[256, 128\]"):
        engine.update_weights_from_disk(other)


def test_damaged_config_json_is_answered_or_named(dirs, tmp_path):
    """Seeded: fields removed, added or replaced by values of every other type; the engine starts (the damage
    missed what it reads, or kept an equivalent value) or raises an error naming config.json."""
    rng, outcomes = random.Random("config-json"), {"started": 0, "named": 0}
    for shape, good in dirs.items():
        config = json.loads((good / "config.json").read_text())
        for k in range(120):
            bad = _with_config(good, tmp_path, mutate(config, rng), f"{shape}-{k}")
            try:
                ReferenceEngine(bad).close()
                outcomes["started"] += 1
            except ValueError as exc:  # InputError, or read_hf_config's ValueError for a file that is no object
                assert str(bad / "config.json") in str(exc), str(exc)
                outcomes["named"] += 1
            shutil.rmtree(bad)
    assert outcomes["started"] and outcomes["named"], outcomes


def test_every_packaged_shape_is_a_valid_config():
    assert all(isinstance(cfg, (TinyConfig, MoeConfig)) for cfg in SHAPES.values())
    with pytest.raises(InputError, match="hidden_size .100. is not a multiple of num_attention_heads .3."):
        TinyConfig(hidden_size=100, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(InputError, match=r"num_experts_per_tok \(9\) is more than num_experts \(8\)"):
        MoeConfig(num_experts_per_tok=9)
