"""One rank of a real megatron-core training run: `python -m pytest_miles.trainers.megatron_worker SPEC.json`.

Started once per rank by `MegatronTrainer` with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set.
gloo on CPU, NCCL on GPU; deterministic mode; a seeded synthetic token stream; torch_dist
checkpoints in Megatron's layout (iter_XXXXXXX/ + latest_checkpointed_iteration.txt).

On CPU only public extension points are used: `model_parallel_cuda_manual_seed(...,
inference_rng_tracker=True)`, a CPU core attention supplied through the layer ModuleSpec,
and a save strategy (TorchDistSaveShardedStrategy subclass) that stages tensors without CUDA.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path


def _cpu_core_attention():
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class CPUDotProductAttention(DotProductAttention):
        """DotProductAttention without the CUDA-only global memory buffer."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if rep > 1:
                key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
            sq, sk = scores.shape[-2:]
            if attention_mask is None:
                attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)[None, None]
            scores = scores.masked_fill(attention_mask, float("-inf"))
            probs = self.attention_dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype))
            ctx = torch.matmul(probs, v)
            b, n, s, hn = ctx.shape
            return ctx.permute(2, 0, 1, 3).reshape(s, b, n * hn)

    return CPUDotProductAttention


def _save_strategy(cuda: bool):
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class HostSaveStrategy(TorchDistSaveShardedStrategy):
        """On CPU: stages tensors synchronously (no torch.cuda.synchronize) and finalizes with a
        host tensor for the failure broadcast (megatron-core's finalize asks for a CUDA device)."""

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            req = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
            if cuda:
                return req
            return req._replace(preload_fn=partial(writer.preload_tensors, writer.write_buckets, False),
                                finalize_fns=[partial(_finalize_on_host, *save_state_dict_ret)])

    return HostSaveStrategy("torch_dist", 1, thread_count=1)


def _finalize_on_host(storage_writer, global_metadata, dist_wrapper) -> None:
    """megatron-core's save_state_dict_async_finalize, with the failure flag on the host."""
    import torch
    from megatron.core.dist_checkpointing.core import CheckpointingException

    results = dist_wrapper.gather_object(storage_writer.retrieve_write_results())
    failures = {}
    if dist_wrapper.is_coordinator:
        failures = {i: r for i, r in enumerate(results or []) if isinstance(r, BaseException)}
        if not failures:
            storage_writer.finish(global_metadata, results)
    flag = torch.tensor([int(bool(failures))], dtype=torch.int)
    torch.distributed.broadcast(flag, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group)
    if flag.item():
        raise CheckpointingException(f"checkpoint write failed: {failures or 'on the coordinator'}")


# Every global state a run of this worker reads, reset before each run (the first run of a fresh
# process too, so a pooled run and a fresh one take one path). Names: what `skip_resets` can leave out,
# for the pool's negative control only (tests/trainers/test_trainer_pool.py).
RESETS = ("deterministic_flags", "parallel_state", "microbatches", "rerun_state", "moe_tracker", "rng")


def fresh_globals(spec: dict, skip=()) -> None:
    """The process's global state as a fresh process has it before a run of `spec`: torch's
    deterministic flags, megatron-core's parallel_state (and its global memory buffer), the
    num-microbatches calculator, the rerun state machine, the MoE loss tracker, then every RNG
    (torch CPU and CUDA, megatron's RNG tracker re-created) seeded from spec["seed"]."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    unknown = sorted(set(skip) - set(RESETS))
    if unknown:
        raise ValueError(f"skip_resets: {', '.join(unknown)} unknown; accepted: {', '.join(RESETS)}")
    if "deterministic_flags" not in skip:
        torch.use_deterministic_algorithms(spec.get("deterministic", True))
        torch.backends.cudnn.deterministic = spec.get("deterministic", True)
        torch.backends.cudnn.benchmark = False
    if "parallel_state" not in skip:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=spec["tensor_parallel"])
    if "microbatches" not in skip:
        from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

        destroy_num_microbatches_calculator()
    if "rerun_state" not in skip:
        from megatron.core.rerun_state_machine import destroy_rerun_state_machine

        destroy_rerun_state_machine()
    if "moe_tracker" not in skip:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    if "rng" not in skip:
        torch.manual_seed(spec["seed"])
        model_parallel_cuda_manual_seed(spec["seed"], inference_rng_tracker=spec["device"] != "cuda",
                                        force_reset_rng=True)


class Rank:
    """One rank's live state: process group, model, optimizer, checkpoint save/load. Built once;
    `main` trains a run with it, `megatron_session` keeps it up and takes commands."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        import torch
        import torch.distributed as dist

        self.cuda = cuda = spec["device"] == "cuda"
        if not dist.is_initialized():  # a pooled rank (pool_rank.py) keeps its process group between runs
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)))
            dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world)
        from megatron.core import parallel_state

        self.tp = tp = spec["tensor_parallel"]
        self.seed = spec["seed"]
        fresh_globals(spec, skip=spec.get("skip_resets", ()))
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.m = m = spec["model"]
        self.model = _build_model(spec, m, tp, cuda)
        self.device = torch.device("cuda" if cuda else "cpu")
        self.model.to(self.device)
        self.te = spec.get("transformer_impl", "local") == "transformer_engine"
        if self.te:  # bf16 params and fp32 output, as Megatron's --bf16 (te_model.py)
            from pytest_miles.trainers.te_model import wrap_bf16

            self.model = wrap_bf16(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec["lr"], weight_decay=0.01, foreach=False)
        self.strategy = _save_strategy(cuda)
        self.start = 0

    def state_dicts(self):
        import torch
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        world, rank = self.world, self.rank
        sd = self.model.sharded_state_dict(prefix="model.")
        sd["optimizer"] = ShardedObject("optimizer.rank_state", self.opt.state_dict(), (world,), (rank,), replica_id=0)
        sd["rng"] = ShardedObject("rng.rank_state", {"torch": torch.get_rng_state(),
                                                    "cuda": torch.cuda.get_rng_state() if self.cuda else None},
                                  (world,), (rank,), replica_id=0)
        return sd

    def load(self, load_root: Path) -> int:
        import torch
        from megatron.core import dist_checkpointing

        tracker = load_root / "latest_checkpointed_iteration.txt"
        if not tracker.exists():
            raise SystemExit(f"{tracker}: missing, nothing to resume from in {load_root}")
        start = int(tracker.read_text().strip())
        loaded = dist_checkpointing.load(self.state_dicts(), str(load_root / f"iter_{start:07d}"))
        self.model.load_state_dict({k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")},
                                   strict=False)
        self.opt.load_state_dict(loaded["optimizer"])
        torch.set_rng_state(loaded["rng"]["torch"])
        if self.cuda and loaded["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(loaded["rng"]["cuda"])
        self.start = start
        return start

    def save(self, save_dir: Path, it: int) -> str:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        it_dir = save_dir / f"iter_{it:07d}"
        if self.rank == 0:
            it_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        sd = self.state_dicts()
        sd["iteration"] = it
        sd["args"] = {"seed": self.seed, "lr": self.spec["lr"], "tensor_parallel": self.tp, "model": self.m}
        dist_checkpointing.save(sd, str(it_dir), sharded_strategy=self.strategy)
        if self.rank == 0:
            from pytest_miles._files import atomic_write

            atomic_write(save_dir / "latest_checkpointed_iteration.txt", str(it))
        dist.barrier()
        return str(it_dir)

    def grad_norm_and_step(self):
        """DP-average the grads, the global grad norm (float64), one optimizer step."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        model = self.model
        dp_group = parallel_state.get_data_parallel_group()
        if parallel_state.get_data_parallel_world_size() > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad /= parallel_state.get_data_parallel_world_size()
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in model.parameters():
            if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.double().pow(2).sum()
        if self.tp > 1:
            dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return sq.sqrt()

    def dp_mean(self, value):
        import torch.distributed as dist
        from megatron.core import parallel_state

        lv = value.detach().double()
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(lv, group=parallel_state.get_data_parallel_group())
            lv /= parallel_state.get_data_parallel_world_size()
        return lv


def _cpu_rotary(rotary):
    """megatron-core's RotaryEmbedding.get_emb moves its frequencies to CUDA unconditionally; on
    CPU the same computation stays on the host (subclass, swapped in after construction)."""
    import torch

    class HostRotaryEmbedding(type(rotary)):
        def get_emb(self, max_seq_len: int, offset: int = 0):
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            if not self.rotary_interleaved:
                emb = torch.cat((freqs, freqs), dim=-1)
            else:
                emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
            return emb[:, None, None, :]

    rotary.__class__ = HostRotaryEmbedding


def _build_model(spec: dict, m: dict, tp: int, cuda: bool):
    """GPTModel from ModelArgs: the tiny GPT default, or the Qwen2 architecture (RMSNorm,
    SwiGLU, qkv bias only, RoPE, tied embeddings per config) when the loop asks for it."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = {}
    if m.get("swiglu"):
        extra.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu, bias_activation_fusion=False)
    if m.get("kv_channels"):
        extra["kv_channels"] = m["kv_channels"]
    from pytest_miles.trainers.moe_router import host_router_class, moe_config_fields

    extra.update(moe_config_fields(m))
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m.get("num_query_groups"), ffn_hidden_size=m.get("ffn_hidden_size"),
        tensor_model_parallel_size=tp, use_cpu_initialization=True, deterministic_mode=spec.get("deterministic", True),
        params_dtype=torch.float32, hidden_dropout=m.get("dropout", 0.0), attention_dropout=m.get("dropout", 0.0),
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False,
        normalization=m.get("normalization", "LayerNorm"), layernorm_epsilon=m.get("layernorm_epsilon", 1e-5),
        add_bias_linear=m.get("add_bias_linear", True), add_qkv_bias=m.get("add_qkv_bias", False),
        rotary_interleaved=m.get("rotary_interleaved", False), **extra,
    )
    layer_spec = get_gpt_layer_local_spec(normalization=m.get("normalization", "LayerNorm"),
                                          num_experts=m.get("num_moe_experts"),
                                          qk_layernorm=bool(m.get("qk_layernorm")))
    if not cuda:
        layer_spec.submodules.self_attention.submodules.core_attention = _cpu_core_attention()
    if spec.get("transformer_impl", "local") == "transformer_engine":  # te_model.py
        from pytest_miles.trainers.te_model import te_config_and_spec

        config, layer_spec = te_config_and_spec(config, spec)
    if m.get("num_moe_experts"):  # moe_router.py: records and replays (gates as megatron-core does on CUDA with TE)
        layer_spec.submodules.mlp.submodules.router = host_router_class()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=m["vocab_size"],
        max_sequence_length=m["seq_length"],
        position_embedding_type=m.get("position_embedding_type", "learned_absolute"),
        rotary_base=int(m.get("rotary_base", 10000)),
        share_embeddings_and_output_weights=m.get("tie_embeddings", False),
    )
    if not cuda and getattr(model, "rotary_pos_emb", None) is not None:
        _cpu_rotary(model.rotary_pos_emb)
    return model


def train_run(r: Rank, spec: dict) -> dict:
    """The run `spec` describes, on a built Rank: its steps from the start (or the loaded
    checkpoint), checkpoints at spec["save_steps"]; rank 0's result (what result.json holds)."""
    import torch

    rank, cuda, device, model, m, seed = r.rank, r.cuda, r.device, r.model, r.m, r.seed
    seq = m["seq_length"]
    save_dir = Path(spec["save_dir"]) if spec.get("save_dir") else None
    start = r.load(Path(spec["load_dir"])) if spec.get("load_dir") else 0
    dp_rank = r.dp_rank

    mbs = spec["micro_batch_size"]
    losses, grad_norms, saved, step_times = [], [], [], []
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)[None, None]
    if r.te:
        causal = None  # TE attention applies the spec's causal mask type itself
    position_ids = torch.arange(seq, device=device)[None].expand(mbs, seq)
    for step in range(start, spec["steps"]):
        t0 = time.perf_counter()
        depart = spec.get("data_seed_from_step")
        data_seed = depart[1] if depart and step + 1 >= depart[0] else seed
        g = torch.Generator().manual_seed(data_seed * 100003 + step * 131 + dp_rank)
        tokens = torch.randint(0, m["vocab_size"], (mbs, seq + 1), generator=g).to(device)
        out = model(tokens[:, :-1], position_ids, causal, labels=tokens[:, 1:])
        loss = out.float().mean()
        loss.backward()
        norm = r.grad_norm_and_step()
        lv = r.dp_mean(loss)
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        losses.append(float(lv))
        grad_norms.append(float(norm))
        it = step + 1
        if save_dir is not None and it in spec.get("save_steps", []):
            saved.append(r.save(save_dir, it))
    result = {
        "losses": losses,
        "loss_bits": [x.hex() for x in losses],
        "grad_norms": grad_norms,
        "grad_norm_bits": [x.hex() for x in grad_norms],
        "checkpoints": saved,
        "first_step": start,
        "step_times": step_times,
        "device": spec["device"],
        "pid": os.getpid(),
    }
    if r.te and rank == 0:
        from pytest_miles.trainers.te_model import te_facts

        result["facts"] = te_facts(spec)
    return result


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch.distributed as dist

    r = Rank(spec)
    result = train_run(r, spec)
    if r.rank == 0:
        from pytest_miles._files import atomic_write

        atomic_write(spec["result"], json.dumps(result))  # the parent never reads half a result
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
