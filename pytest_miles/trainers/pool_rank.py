"""One rank of a trainer pool: `python -m pytest_miles.trainers.pool_rank DEVICE [READY_DIR]`.

Started once per rank by `TrainerPool` (pool.py) with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set;
imports what a run builds with (torch, megatron-core: PRELOAD), joins the process group once, then
says so (READY_DIR/rank{RANK}: the pool's "started" time) and takes one JSON command per stdin line
until EOF:
{"spec": SPEC.json} builds a fresh `Rank` for that run (megatron_worker.fresh_globals first: every
global state reset and reseeded, as a fresh process has it), trains it with the same code as a
fresh process (megatron_worker.train_run), and rank 0 writes the result file atomically;
{"session": SPEC.json} turns the rank into a `MegatronSession` rank for the rest of its life (a
spare: the pool hands it to one session, whose commands follow on stdin; megatron_session.main);
{"plant": seed} leaves a state leak behind on purpose (the pool's negative control: the next run
must not see it). A failure exits the rank with its traceback, as a fresh process would.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def plant(seed: int, device: str) -> None:
    """A leak a run without resets would inherit: every RNG reseeded, megatron's RNG tracker
    re-made, deterministic algorithms off."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=device != "cuda", tp_rank=0, ep_rank=0,
                                    etp_rank=0, force_reset_rng=True)  # ranks given: parallel_state may be down
    torch.use_deterministic_algorithms(False)


# Imported before the rank says it is ready, so that a run (or a session) handed to it later pays none
# of it: what Rank builds with. Importing a module earlier changes nothing a run computes.
PRELOAD = ("megatron.core.parallel_state", "megatron.core.tensor_parallel", "megatron.core.models.gpt",
           "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.transformer.transformer_config",
           "megatron.core.dist_checkpointing", "megatron.core.dist_checkpointing.strategies.torch",
           "pytest_miles.trainers.megatron_session")


def main(device: str, ready_dir: str | None = None) -> None:
    import importlib

    import torch
    import torch.distributed as dist

    from pytest_miles._files import atomic_write
    from pytest_miles.trainers.megatron_worker import Rank, train_run

    rank = int(os.environ["RANK"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]))
    for name in PRELOAD:
        importlib.import_module(name)
    if device == "cuda":  # every rank joined (and NCCL's communicator is up)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    print("pool rank ready", flush=True)
    if ready_dir is not None:
        atomic_write(Path(ready_dir) / f"rank{rank}", "ready")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "session" in cmd:  # a spare: this process serves that session until EOF, then ends
            from pytest_miles.trainers.megatron_session import main as session

            print(f"session: {cmd['session']}", flush=True)
            return session(cmd["session"], sys.stdin)
        if "plant" in cmd:
            plant(int(cmd["plant"]), device)
            continue
        spec = json.loads(Path(cmd["spec"]).read_text())
        print(f"run {cmd['run']}: {cmd['spec']}", flush=True)
        r = Rank(spec)
        result = train_run(r, spec)
        del r  # the model and optimizer of this run go before the next one is built
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            atomic_write(spec["result"], json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
