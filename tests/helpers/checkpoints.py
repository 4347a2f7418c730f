"""Real checkpoints for the tests: torch.distributed.checkpoint (gloo), safetensors, torch.save."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import torch


def make_state(seed: int = 0, layers: int = 3, hidden: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    state: dict = {"embedding.word_embeddings.weight": torch.randn(128, hidden, generator=g)}
    for i in range(layers):
        p = f"decoder.layers.{i}"
        state[f"{p}.self_attention.linear_qkv.weight"] = torch.randn(3 * hidden, hidden, generator=g).to(torch.bfloat16)
        state[f"{p}.mlp.linear_fc1.weight"] = torch.randn(4 * hidden, hidden, generator=g)
        state[f"{p}.mlp.linear_fc1.bias"] = torch.zeros(4 * hidden)
    state["position_ids"] = torch.arange(32, dtype=torch.int64)
    return state


def optimizer_state(seed: int) -> dict:
    """A model and its AdamW state after two steps, as DCP saves them (nested dicts, step tensors,
    param_groups as non-tensor items)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "iteration": 2, "args": {"seed": seed, "lr": 1e-3}}


def flip_bit(t: torch.Tensor, flat_index: int, bit: int = 0) -> torch.Tensor:
    t = t.clone()
    iv = t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).reshape(-1)
    iv[flat_index] ^= 1 << bit
    return t


def save_dcp(path: Path, state: dict, extra: dict | None = None) -> Path:
    """World size 1, gloo process group, as Megatron's torch_dist backend would on one rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True, exist_ok=True)
    owns = not dist.is_initialized()
    if owns:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dcp.save({**state, **(extra or {})}, checkpoint_id=str(path))
    finally:
        if owns:
            dist.destroy_process_group()
    return path


def tree_state(path: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file below path: proof that nothing was written."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):  # FIFOs, sockets, symlinks: their mtime, never their content
                out[str(p)] = ("", st.st_mtime_ns)
                continue
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_ranks(script: str, world: int, *args: str) -> None:
    """`world` real processes on gloo (tcp://127.0.0.1), each running `script` with its rank."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(world), port, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    try:
        outs = [p.communicate(timeout=180)[0].decode() for p in procs]
        bad = [f"rank {r} (exit {p.returncode}):\n{outs[r][-3000:]}" for r, p in enumerate(procs) if p.returncode]
        assert not bad, "\n".join(bad)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


LAYOUTS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from pathlib import Path
    rank, world, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from pytest_miles.trainers.megatron_worker import _save_strategy
    g = torch.Generator().manual_seed(0)
    qkv, fc2, norm = torch.randn(96, 32, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)

    def megatron(path, tp, flip=False):  # tensor parallel tp over the world's ranks (replicated when tp == 1)
        def shard(t, dim):
            if tp == 1:
                return t.clone()
            n = t.shape[dim] // tp
            return t.narrow(dim, rank * n, n).clone()
        def st(name, t, dim):
            if tp == 1:
                return ShardedTensor.from_rank_offsets(name, shard(t, dim), replica_id=rank)
            return ShardedTensor.from_rank_offsets(name, shard(t, dim), (dim, rank, tp), replica_id=0)
        w2 = shard(fc2, 1)
        if flip and rank == 1:
            w2.view(torch.int32)[3, 5] ^= 1  # one bit, in rank 1's half: global element [3, 37]
        sd = {"model.decoder.layers.0.self_attention.linear_qkv.weight": st(
                  "model.decoder.layers.0.self_attention.linear_qkv.weight", qkv, 0),
              "model.decoder.layers.0.mlp.linear_fc2.weight": ShardedTensor.from_rank_offsets(
                  "model.decoder.layers.0.mlp.linear_fc2.weight", w2, *([(1, rank, tp)] if tp > 1 else []),
                  replica_id=0 if tp > 1 else rank),
              "model.decoder.final_layernorm.weight": ShardedTensor.from_rank_offsets(  # written by rank 1
                  "model.decoder.final_layernorm.weight", norm.clone(), replica_id=1 - rank),
              "iteration": 10}
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(sd, str(path), sharded_strategy=_save_strategy(False))
        dist.barrier()

    megatron(root / "megatron-tp1", 1)
    megatron(root / "megatron-tp2", 2)
    megatron(root / "megatron-tp2-flip", 2, flip=True)
    from torch.distributed.tensor import distribute_tensor, Shard, Replicate
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    full = {"layers.0.weight": torch.randn(64, 16, generator=g), "layers.0.bias": torch.randn(64, generator=g)}
    for name, p in (("dtensor-replicated", [Replicate()]), ("fsdp2-sharded", [Shard(0)])):
        dcp.save({k: distribute_tensor(v, mesh, p) for k, v in full.items()}, checkpoint_id=str(root / name))
    dist.destroy_process_group()
""")


def save_parallel_layouts(root: Path) -> Path:
    """One launch of 2 gloo ranks writes the same weights in several layouts: megatron-core
    dist_checkpointing (torch_dist) with TP 1 (replicated) and TP 2 (sharded; and once with one
    flipped bit), and torch DCP DTensors replicated vs sharded on dim 0 (FSDP2's layout)."""
    root.mkdir(parents=True, exist_ok=True)
    _run_ranks(LAYOUTS, 2, str(root))
    return root


def save_hf(root: Path, state: dict, split: int, metadata: dict | None = None) -> Path:
    """An HF-style dir: the tensors split into two safetensors shards at `split`, plus the index."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(root / shard), metadata=metadata)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    return root


def save_legacy_megatron(run: Path, iteration: int, state: dict, tp: int = 1, pp: int = 1,
                         extra: dict | None = None) -> Path:
    """Megatron-LM's legacy (non-distributed) layout: iter_XXXXXXX/mp_rank_NN[_PPP]/model_optim_rng.pt
    with the model split column-wise over tp and layer-wise over pp, plus the tracker file."""
    import argparse

    import numpy as np

    it = run / f"iter_{iteration:07d}"
    names = list(state)
    for t in range(tp):
        for p in range(pp):
            d = it / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
            d.mkdir(parents=True)
            mine = names[p::pp]
            model = {k: state[k].chunk(tp, 0)[t].clone() if state[k].dim() else state[k] for k in mine}
            torch.save({"iteration": iteration, "checkpoint_version": 3.0, "model": model,
                        "args": argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                   params_dtype=torch.float32, lr=1e-4),
                        "rng_state": [{"random_rng_state": (3, tuple(range(8)), None),
                                       "np_rng_state": np.random.RandomState(0).get_state(),
                                       "torch_rng_state": torch.arange(16, dtype=torch.uint8)}],
                        **(extra or {})}, d / "model_optim_rng.pt")
    (run / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return run
