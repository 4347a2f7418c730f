"""Per layer point records of a megatron-core rank through forward (and backward) hooks, in the
divergence locator's names (checks.locate): embedding, layers.N.{input_norm, attention,
post_attention_norm, mlp, output}, final_norm, logits. Sublayers a spec fuses away (TE puts the
norms inside its linear layers: IdentityOp here) are simply not recorded."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def points(model) -> dict[str, object]:
    """canonical name -> module of a GPTModel (unwrapped from the bf16 wrapper when there is one)."""
    inner = model
    while not hasattr(inner, "decoder") and hasattr(inner, "module"):
        inner = inner.module
    out = {"embedding": inner.embedding}
    for n, layer in enumerate(inner.decoder.layers):
        for name, attr in (("input_norm", "input_layernorm"), ("attention", "self_attention"),
                           ("post_attention_norm", "pre_mlp_layernorm"), ("mlp", "mlp")):
            mod = getattr(layer, attr, None)
            if mod is not None and type(mod).__name__ != "IdentityOp":
                out[f"layers.{n}.{name}"] = mod
        out[f"layers.{n}.output"] = layer
    if getattr(inner.decoder, "final_layernorm", None) is not None:
        out["final_norm"] = inner.decoder.final_layernorm
    out["logits"] = inner.output_layer
    return out


def _first(value):
    """A module's output as one tensor: megatron's (output, bias) and (hidden, context) pairs give their first."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _rows(t, tp_gather: bool = False):
    """[s, b, h] -> [b, s, h] (megatron's layout to the engine's), detached on the host in fp32."""
    return t.detach().transpose(0, 1).float().cpu().contiguous()


@contextmanager
def traced(model, store: dict, backward: dict | None = None, order: list | None = None):
    """Forward hooks put each point's output in `store`; with `backward`, full backward hooks put the
    gradient of each point's output there and its name in `order` as it is computed."""
    handles = []
    for name, mod in points(model).items():
        handles.append(mod.register_forward_hook(
            lambda m, i, o, name=name: store.__setitem__(name, _rows(_first(o)))))
        if backward is not None:
            def grad_hook(m, gin, gout, name=name):
                g = _first(gout)
                if g is not None:
                    backward[name] = _rows(g)
                    order.append(name)
            handles.append(mod.register_full_backward_hook(grad_hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def save_points(path: Path, records: dict[str, object]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in records.items()}, str(path))
    return path
