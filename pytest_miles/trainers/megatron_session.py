"""One rank of a `MegatronSession`: `python -m pytest_miles.trainers.megatron_session SPEC.json`.

Builds the rank once (megatron_worker.Rank), loads the initial HF weights through
pytest_miles.models.convert (or resumes a checkpoint), then takes one JSON command per stdin line until
EOF: ready, logprobs, train (one GRPO step, Miles' PPO-clip policy loss), save, export.
Rank 0 writes each answer to the command's reply file (atomically: written, then renamed).
A spare rank started in the background by a trainer pool (pool_rank.py: imports done, process group
joined) runs the same `main` once it is handed its session's spec.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from pytest_miles.trainers.megatron_worker import Rank

# TE's FP8 GEMMs want the token count a multiple of 16 (megatron-core fp8_utils.get_fp8_align_size: 16
# for block-wise, 32 for MXFP8): a quantized TE rank right-pads every batch to that width (causal: the
# real positions never see the pads, whose scores are dropped).
QUANTIZED_WIDTH_MULTIPLE = {"fp8_blockwise": 16, "mxfp8": 32, "nvfp4": 32}


def batch_width(spec: dict, samples: list[dict]) -> int:
    """The batch's width: its longest sample, right-padded to the quantized GEMMs' multiple."""
    width = max(len(s["tokens"]) for s in samples)
    if spec.get("transformer_impl") != "transformer_engine":
        return width
    k = QUANTIZED_WIDTH_MULTIPLE.get(spec.get("precision") or "bf16", 1)
    return -(-width // k) * k


def _batch(r: Rank, samples: list[dict]):
    """Right-padded tokens, causal mask, positions, and the (row, position, target) of every
    response token: position t predicts token t+1."""
    import torch

    width = batch_width(r.spec, samples)
    tokens = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :len(s["tokens"])] = torch.tensor(s["tokens"])
    tokens = tokens.to(r.device)
    mask = None if r.te else torch.ones(width, width, dtype=torch.bool, device=r.device).triu(1)[None, None]
    pos = torch.arange(width, device=r.device)[None].expand(len(samples), width)
    return tokens, mask, pos


def _response_logprobs(r: Rank, samples: list[dict], where: list | None = None):
    """Per sample, a 1-D tensor of logprobs of its response tokens (differentiable). `where`, when
    given, receives per sample the (target ids, input positions) gathered: what parity checks."""
    import torch

    tokens, mask, pos = _batch(r, samples)
    logits = r.model(tokens, pos, mask)  # [b, s, vocab / tp]
    if r.tp > 1:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, s in enumerate(samples):
        p, n = s["prompt_len"], len(s["tokens"])
        targets = tokens[i, p:n]
        out.append(logp[i, p - 1:n - 1].gather(-1, targets[:, None])[:, 0])
        if where is not None:
            where.append((targets.tolist(), list(range(p - 1, n - 1))))
    return out


def _policy_loss(logp, old, adv: float, eps_clip: float, eps_clip_high: float):
    """Miles' compute_policy_loss (PPO-clip, dual bounds), per token; then the sample's mean."""
    import torch

    ppo_kl = old - logp
    ratio = (-ppo_kl).exp()
    pg1 = -ratio * adv
    pg2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * adv
    return torch.maximum(pg1, pg2).mean()


def _train(r: Rank, cmd: dict) -> dict:
    """One GRPO step; with cmd["trace"] (a path), every point's forward output and backward
    gradient of this step saved there (the locator's records), and the order gradients came in."""
    import contextlib

    import torch
    from megatron.core import parallel_state

    from pytest_miles.trainers.megatron_trace import save_points, traced

    samples = cmd["samples"]
    dp, dpr = parallel_state.get_data_parallel_world_size(), r.dp_rank
    mine = samples[dpr::dp]
    fwd: dict = {}
    bwd: dict = {}
    order: list = []
    hooks = traced(r.model, fwd, bwd, order) if cmd.get("trace") else contextlib.nullcontext()
    with hooks:
        rows = _response_logprobs(r, mine)
        losses = [_policy_loss(lp, torch.tensor(s["old_logprobs"], dtype=torch.float32, device=r.device),
                               float(s["advantage"]), cmd["eps_clip"], cmd["eps_clip_high"])
                  for lp, s in zip(rows, mine)]
        loss = torch.stack(losses).mean()
        loss.backward()
    norm = r.grad_norm_and_step()
    lv = r.dp_mean(loss)
    if r.cuda:
        torch.cuda.synchronize()
    out = {"loss": float(lv).hex(), "grad_norm": float(norm).hex(),
           "logprobs": [[float(x).hex() for x in row.detach().double().tolist()] for row in rows]}
    if cmd.get("trace"):
        records = {**{f"forward/{k}": v for k, v in fwd.items()}, **{f"backward/{k}": v for k, v in bwd.items()}}
        out["trace"] = {"path": str(save_points(Path(cmd["trace"]), records)), "backward_order": order}
    return out


def _replaying(r: Rank, cmd: dict):
    """The forward inside replays cmd["replay"] (experts[sample][token][layer]) when given."""
    from pytest_miles.trainers.moe_router import replay_targets, replaying

    experts = cmd.get("replay")
    if experts is None:
        return replaying(r.model, None)
    return replaying(r.model, replay_targets(experts, batch_width(r.spec, cmd["samples"]),
                                             r.spec["model"]["moe_router_topk"]))


def handle(r: Rank, cmd: dict) -> dict:
    import torch

    op = cmd["op"]
    if op == "ready":
        return {"start": r.start}
    if op == "logprobs":
        with torch.no_grad():
            rows = _response_logprobs(r, cmd["samples"])
        return {"logprobs": [[float(x).hex() for x in row.double().tolist()] for row in rows]}
    if op == "score":  # logprobs with the ids and positions they were taken at (train-rollout parity)
        where: list = []
        with torch.no_grad(), _replaying(r, cmd):
            rows = _response_logprobs(r, cmd["samples"], where)
        return {"logprobs": [[float(x).hex() for x in row.double().tolist()] for row in rows],
                "targets": [t for t, _ in where], "positions": [p for _, p in where]}
    if op == "train":
        return _train(r, cmd)
    if op == "trace":  # the divergence locator's records of one forward of one sequence
        from pytest_miles.trainers.megatron_trace import save_points, traced

        store: dict = {}
        with torch.no_grad(), traced(r.model, store):
            _response_logprobs(r, [{"tokens": cmd["tokens"], "prompt_len": 1}])
        return {"path": str(save_points(Path(cmd["path"]), {k: v[0] for k, v in store.items()}))}
    if op == "reset":  # the initial HF weights again and a fresh optimizer: a second run in the same ranks
        load_hf(r, Path(cmd["init_hf"]))
        r.opt = torch.optim.AdamW(r.model.parameters(), lr=r.spec["lr"], weight_decay=0.01, foreach=False)
        return {"reset": True}
    if op == "routing":  # the experts each sample's tokens go to, from one forward (moe_router.py)
        from pytest_miles.trainers.moe_router import record_routing

        samples = cmd["samples"]
        tokens, mask, pos = _batch(r, samples)
        with torch.no_grad(), _replaying(r, cmd):
            return {"records": record_routing(r.model, lambda: r.model(tokens, pos, mask), "megatron-core forward",
                                              [list(s["tokens"]) for s in samples])}
    if op == "save":
        return {"checkpoint": r.save(Path(cmd["save_dir"]), int(cmd["iteration"]))}
    if op == "export":
        return {"path": str(export(r, Path(cmd["path"]), cmd.get("dtype", "float32")))}
    if op == "state":
        return {"path": str(export_state(r, Path(cmd["path"])))}
    raise ValueError(f"unknown command {op!r}")


def _tiny_config(spec: dict):
    from pytest_miles.models.embedded import TinyConfig
    from pytest_miles.models.moe import MoeConfig

    if not spec.get("hf_config"):
        raise ValueError("this session has no hf_config: export and init_hf need the HF model's shapes")
    raw = spec["hf_config"]
    return MoeConfig(**raw) if "num_experts" in raw else TinyConfig(**raw)


def _moe_layout(r: Rank) -> dict:
    """The converter's arguments for this rank's MoE layer: the layer spec, and TEGroupedMLP's names
    (`te_grouped`) or SequentialMLP's (`local`, TE linears or megatron-core's own)."""
    grouped = r.te and r.spec["model"].get("moe_grouped_gemm", True)
    return {"experts": "te_grouped" if grouped else "local", "spec": "te" if r.te else "local"}


def _to_megatron(r: Rank, hf: dict, cfg):
    from pytest_miles.models.convert import hf_to_megatron
    from pytest_miles.models.convert_moe import hf_to_megatron_moe
    from pytest_miles.models.moe import MoeConfig

    if isinstance(cfg, MoeConfig):
        return hf_to_megatron_moe(hf, cfg, **_moe_layout(r))
    return hf_to_megatron(hf, cfg, spec="te" if r.te else "local")


def _to_hf(r: Rank, state: dict, cfg):
    from pytest_miles.models.convert import megatron_to_hf
    from pytest_miles.models.convert_moe import megatron_to_hf_moe
    from pytest_miles.models.moe import MoeConfig

    if isinstance(cfg, MoeConfig):
        return megatron_to_hf_moe(state, cfg, **_moe_layout(r))
    return megatron_to_hf(state, cfg, spec="te" if r.te else "local")


def export(r: Rank, path: Path, dtype: str) -> Path:
    """Rank 0 writes the HF checkpoint (tensor parallel 1: the full weights live on every rank)."""
    from pytest_miles.models.embedded import save_hf_weights

    if r.tp != 1:
        raise ValueError(f"export with tensor_parallel {r.tp}: only 1 is supported (no TP gather yet)")
    cfg = _tiny_config(r.spec)
    if r.rank == 0:
        state = {k: v for k, v in r.model.state_dict().items() if not k.endswith("_extra_state")}
        save_hf_weights(path, _to_hf(r, state, cfg), cfg, dtype)
    return path


def export_state(r: Rank, path: Path) -> Path:
    """Rank 0 writes the model's own state dict (megatron names and dtypes, no `_extra_state`) as
    one safetensors file: what the trainer holds, for the served-weights check."""
    from safetensors.torch import save_file

    if r.tp != 1:
        raise ValueError(f"state with tensor_parallel {r.tp}: only 1 is supported (no TP gather yet)")
    if r.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in r.model.state_dict().items()
                 if not k.endswith("_extra_state") and v is not None}
        save_file(state, str(path))
    return path


def load_hf(r: Rank, path: Path) -> None:
    """The initial weights: an HF checkpoint converted to megatron's names, loaded strictly."""
    import torch

    from pytest_miles.models.embedded import load_safetensors_dir

    if r.tp != 1:
        raise ValueError(f"init_hf with tensor_parallel {r.tp}: only 1 is supported (no TP split yet)")
    hf = load_safetensors_dir(path)
    state = {k: v.to(torch.float32) for k, v in _to_megatron(r, hf, _tiny_config(r.spec)).items()}
    own = r.model.state_dict()
    # TE keeps an absent bias as an empty tensor: nothing to load there
    missing = sorted(k for k in own if k not in state and not k.endswith("_extra_state") and own[k].numel())
    if missing:
        raise ValueError(f"{path}: the converted weights lack {', '.join(missing[:5])}")
    with torch.no_grad():
        for k, v in state.items():
            if k not in own:
                raise ValueError(f"{path}: converted key {k!r} is not in the megatron model")
            if own[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {list(v.shape)}, the model wants {list(own[k].shape)}")
            own[k].copy_(v)


def main(spec_path: str, lines=None) -> None:
    """Build the rank from the spec, then take commands from `lines` (stdin by default) until EOF.
    A spare rank of a trainer pool (pool_rank.py) calls it with the rest of its stdin."""
    spec = json.loads(Path(spec_path).read_text())
    r = Rank(spec)
    if spec.get("load_dir"):
        r.load(Path(spec["load_dir"]))
    elif spec.get("init_hf"):
        load_hf(r, Path(spec["init_hf"]))
    import torch.distributed as dist

    for line in sys.stdin if lines is None else lines:
        cmd = json.loads(line)
        try:
            out = handle(r, cmd)
        except Exception:
            out = {"error": traceback.format_exc()}
        if r.rank == 0:
            from pytest_miles._files import atomic_write

            atomic_write(cmd["reply"], json.dumps(out))
        if "error" in out:
            print(out["error"], file=sys.stderr, flush=True)
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
