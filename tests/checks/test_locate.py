"""The divergence locator over records (no launch): first differing point in forward order, growth,
and per step / phase for two trainer runs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks.locate import canonical_order, locate_in_steps, profile_layers  # noqa: E402
from pytest_miles.errors import InputError  # noqa: E402

NAMES = ["embedding"] + [f"layers.{n}.{s}" for n in range(6)
                         for s in ("input_norm", "attention", "post_attention_norm", "mlp", "output")] + ["logits"]


def record(plant: str | None = None, by: float = 1e-3):
    g = torch.Generator().manual_seed(0)
    out, hit = {}, False
    for name in NAMES:
        t = torch.randn(4, 8, generator=g)
        hit = hit or name == plant
        out[name] = t + by if hit else t  # a fault grows through everything after it
    return out


def test_canonical_order():
    assert canonical_order(["logits", "layers.10.mlp", "layers.2.output", "layers.2.attention", "embedding"]) == \
        ["embedding", "layers.2.attention", "layers.2.output", "layers.10.mlp", "logits"]


def test_first_point_and_growth():
    prof = profile_layers(record(), record("layers.3.attention"))
    assert prof.first["name"] == "layers.3.attention"
    assert "first differs at layer 3 attention" in prof.answer() and "layer 3 input norm before it agrees" in \
        prof.answer()
    assert "<- first" in prof.render()
    same = profile_layers(record(), record())
    assert same.first is None and "agree at every one of 32 points (32 bitwise equal)" in same.answer()
    assert profile_layers(record(), record("layers.0.mlp", 1e-6), tolerance=1e-5).first is None
    with pytest.raises(InputError, match="share no point"):
        profile_layers({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(InputError, match="shapes"):
        profile_layers({"logits": torch.zeros(2)}, {"logits": torch.zeros(3)})


def test_step_three_backward_layer_five_mlp():
    fwd = record()
    clean = [{"forward": fwd, "backward": record()} for _ in range(4)]
    planted = [dict(s) for s in clean]
    planted[2] = {"forward": fwd, "backward": {**record(), "layers.5.mlp": record()["layers.5.mlp"] + 1e-6}}
    found = locate_in_steps(clean, planted)
    assert found.answer().startswith("step 3, backward, layer 5 mlp first differs"), found.answer()
    assert (
        locate_in_steps(clean, clean).answer() == "the two runs agree at every point of 4 steps, forward and backward"
    )
    with pytest.raises(InputError, match="4 steps recorded in one run, 3 in the other"):
        locate_in_steps(clean, clean[:3])
