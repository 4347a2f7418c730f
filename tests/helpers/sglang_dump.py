"""Files in the layout SGLang 0.5.17's debug tensor dump writes (`debug_utils/tensor_dump_forward_hook.py`),
made from the embedded reference engine's per-layer records: what the CPU tests feed the real
dump reader (pytest_miles.engines.sglang_dump). Not SGLang: the values are the reference model's,
arranged as SGLang's Qwen2 decoder layer hands them over (hidden and residual apart, added inside
the next RMSNorm), one `torch.save` dict per forward pass, under TP{tp}_PP{pp}_Rank{rank}_pid{pid}/."""

from __future__ import annotations

from pathlib import Path


def sglang_pass(records: dict, tokens: list[int], layers: int, previous: dict | None = None) -> dict:
    """One pass's dict as the dumper builds it: every leaf module's output (a list where the module
    returned several tensors), the top-level model's forward-batch inputs, and the previous pass's
    `model` output and logits (the dump is written when the top-level model's hook fires)."""
    import torch

    r = records
    d: dict = {"model.embed_tokens": r["embedding"]}
    for n in range(layers):
        p = f"model.layers.{n}"
        before = r["embedding"] if n == 0 else r[f"layers.{n - 1}.output"]
        d[f"{p}.input_layernorm"] = r[f"layers.{n}.input_norm"] if n == 0 else [r[f"layers.{n}.input_norm"], before]
        rows = r[f"layers.{n}.input_norm"].shape[0]
        d[f"{p}.self_attn.qkv_proj"] = torch.zeros(rows, 7)  # leaves the locator does not compare
        d[f"{p}.self_attn.rotary_emb"] = [torch.zeros(rows, 3), torch.zeros(rows, 2)]
        d[f"{p}.self_attn.attn"] = torch.zeros(rows, 5)
        d[f"{p}.self_attn.o_proj"] = r[f"layers.{n}.attention"]
        d[f"{p}.post_attention_layernorm"] = [r[f"layers.{n}.post_attention_norm"], before + r[f"layers.{n}.attention"]]
        d[f"{p}.mlp.gate_up_proj"] = torch.zeros(rows, 9)
        d[f"{p}.mlp.act_fn"] = torch.zeros(rows, 4)
        d[f"{p}.mlp.down_proj"] = r[f"layers.{n}.mlp"]
    d["model.norm"] = [r["final_norm"], r[f"layers.{layers - 1}.output"]]
    if previous is not None:
        d["model"] = previous["final_norm"]
        d["logits_processor"] = previous["logits"][-1:]
    d["model.forward_batch_info.input_ids"] = torch.tensor(tokens)
    d["model.forward_batch_info.seq_lens"] = torch.tensor([len(tokens)])
    d["model.forward_batch_info.positions"] = torch.arange(len(tokens))
    return d


def sliced(records: dict, start: int, stop: int | None = None) -> dict:
    """The rows [start:stop] of every record (a chunk of a chunked prefill, a decode step's row)."""
    return {k: v[start:stop] for k, v in records.items()}


def write_pass(folder: Path, number: int, content: dict, *, tp: int = 0, pp: int = 0, pid: int = 4242) -> Path:
    import torch

    d = Path(folder) / f"TP{tp}_PP{pp}_Rank{pp + tp}_pid{pid}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"Pass{number:05d}.pt"
    torch.save(content, str(path))  # what the dumper calls (tensor_dump_forward_hook.py:85)
    return path
