"""One rank of a `MegatronSession`: `python -m pytest_miles.trainers.megatron_session SPEC.json`.

Builds the rank once (megatron_worker.Rank), loads the initial HF weights through
pytest_miles.models.convert (or resumes a checkpoint), then takes one JSON command per stdin line until
EOF: ready, logprobs, train (one GRPO step, Miles' PPO-clip policy loss), save, export.
Rank 0 writes each answer to the command's reply file (atomically: written, then renamed).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from pytest_miles.trainers.megatron_worker import Rank


def _batch(r: Rank, samples: list[dict]):
    """Right-padded tokens, causal mask, positions, and the (row, position, target) of every
    response token: position t predicts token t+1."""
    import torch

    width = max(len(s["tokens"]) for s in samples)
    tokens = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :len(s["tokens"])] = torch.tensor(s["tokens"])
    tokens = tokens.to(r.device)
    mask = None if r.te else torch.ones(width, width, dtype=torch.bool, device=r.device).triu(1)[None, None]
    pos = torch.arange(width, device=r.device)[None].expand(len(samples), width)
    return tokens, mask, pos


def _response_logprobs(r: Rank, samples: list[dict]):
    """Per sample, a 1-D tensor of logprobs of its response tokens (differentiable)."""
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
    return out


def _policy_loss(logp, old, adv: float, eps_clip: float, eps_clip_high: float):
    """Miles' compute_policy_loss (PPO-clip, dual bounds), per token; then the sample's mean."""
    import torch

    ppo_kl = old - logp
    ratio = (-ppo_kl).exp()
    pg1 = -ratio * adv
    pg2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * adv
    return torch.maximum(pg1, pg2).mean()


def handle(r: Rank, cmd: dict) -> dict:
    import torch

    op = cmd["op"]
    if op == "ready":
        return {"start": r.start}
    if op == "logprobs":
        with torch.no_grad():
            rows = _response_logprobs(r, cmd["samples"])
        return {"logprobs": [[float(x).hex() for x in row.double().tolist()] for row in rows]}
    if op == "train":
        from megatron.core import parallel_state

        samples = cmd["samples"]
        dp, dpr = parallel_state.get_data_parallel_world_size(), r.dp_rank
        mine = samples[dpr::dp]
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
        return {"loss": float(lv).hex(), "grad_norm": float(norm).hex(),
                "logprobs": [[float(x).hex() for x in row.detach().double().tolist()] for row in rows]}
    if op == "save":
        return {"checkpoint": r.save(Path(cmd["save_dir"]), int(cmd["iteration"]))}
    if op == "export":
        return {"path": str(export(r, Path(cmd["path"]), cmd.get("dtype", "float32")))}
    if op == "state":
        return {"path": str(export_state(r, Path(cmd["path"])))}
    raise ValueError(f"unknown command {op!r}")


def _tiny_config(spec: dict):
    from pytest_miles.models.embedded import TinyConfig

    if not spec.get("hf_config"):
        raise ValueError("this session has no hf_config: export and init_hf need the HF model's shapes")
    return TinyConfig(**spec["hf_config"])


def export(r: Rank, path: Path, dtype: str) -> Path:
    """Rank 0 writes the HF checkpoint (tensor parallel 1: the full weights live on every rank)."""
    from pytest_miles.models.convert import megatron_to_hf
    from pytest_miles.models.embedded import save_hf_weights

    if r.tp != 1:
        raise ValueError(f"export with tensor_parallel {r.tp}: only 1 is supported (no TP gather yet)")
    cfg = _tiny_config(r.spec)
    if r.rank == 0:
        state = {k: v for k, v in r.model.state_dict().items() if not k.endswith("_extra_state")}
        save_hf_weights(path, megatron_to_hf(state, cfg), cfg, dtype)
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

    from pytest_miles.models.convert import hf_to_megatron
    from pytest_miles.models.embedded import load_safetensors_dir

    if r.tp != 1:
        raise ValueError(f"init_hf with tensor_parallel {r.tp}: only 1 is supported (no TP split yet)")
    hf = load_safetensors_dir(path)
    state = {k: v.to(torch.float32)
             for k, v in hf_to_megatron(hf, _tiny_config(r.spec), spec="te" if r.te else "local").items()}
    own = r.model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("_extra_state"))
    if missing:
        raise ValueError(f"{path}: the converted weights lack {', '.join(missing[:5])}")
    with torch.no_grad():
        for k, v in state.items():
            if k not in own:
                raise ValueError(f"{path}: converted key {k!r} is not in the megatron model")
            if own[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {list(v.shape)}, the model wants {list(own[k].shape)}")
            own[k].copy_(v)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    r = Rank(spec)
    if spec.get("load_dir"):
        r.load(Path(spec["load_dir"]))
    elif spec.get("init_hf"):
        load_hf(r, Path(spec["init_hf"]))
    import torch.distributed as dist

    for line in sys.stdin:
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
