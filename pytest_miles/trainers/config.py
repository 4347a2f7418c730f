"""What a Megatron training run is made of: `ModelArgs` (the architecture) and `TrainerConfig`.

`TrainerConfig` is checked once, when it is built: a bad value is an `InputError` that names the
field, the value and what is accepted, before any rank starts (a bad seed would otherwise surface
as a rank crash many seconds later). `MegatronTrainer` builds one from its keyword arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles import validation as v
from pytest_miles.errors import InputError
from pytest_miles.trainers.te_model import resolve_te_options

WHERE = "megatron_trainer_factory"  # how users meet these fields; messages name them so


@dataclass(frozen=True)
class ModelArgs:
    """Mirrors Miles' MODEL_ARGS for the tiny default (learned absolute positions)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = 2
    ffn_hidden_size: int | None = 128
    vocab_size: int = 512
    seq_length: int = 32
    dropout: float = 0.0
    position_embedding_type: str = "learned_absolute"
    # The Qwen2 architecture (`ModelArgs.qwen2`) sets these; the defaults are the tiny GPT above.
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    kv_channels: int | None = None
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    tie_embeddings: bool = False
    # Mixture of experts (`ModelArgs.qwen3_moe`): every layer an MoELayer when num_moe_experts is set.
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    qk_layernorm: bool = False
    # TransformerEngine spec only: the experts as TEGroupedMLP (Miles' --moe-grouped-gemm) or as a
    # SequentialMLP of TE linears; the local spec runs SequentialMLP either way.
    moe_grouped_gemm: bool = True

    @classmethod
    def qwen3_moe(cls, cfg, *, seq_length: int | None = None, rotary_interleaved: bool = False) -> ModelArgs:
        """The architecture of an HF Qwen3-MoE config (a `MoeConfig`): RMSNorm, q/k norms per head,
        no bias, RoPE, every layer an MoELayer (softmax router, top-k renormalised, no aux loss)."""
        return cls(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
                   ffn_hidden_size=cfg.moe_intermediate_size, vocab_size=cfg.vocab_size,
                   seq_length=seq_length or cfg.max_position_embeddings, position_embedding_type="rope",
                   normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, swiglu=True,
                   add_bias_linear=False, add_qkv_bias=False, kv_channels=cfg.head_dim, rotary_base=cfg.rope_theta,
                   rotary_interleaved=rotary_interleaved, tie_embeddings=cfg.tie_word_embeddings,
                   num_moe_experts=cfg.num_experts, moe_router_topk=cfg.num_experts_per_tok,
                   moe_ffn_hidden_size=cfg.moe_intermediate_size, qk_layernorm=True)

    @classmethod
    def of_shape(cls, shape: str, *, seq_length: int = 32) -> ModelArgs:
        """An embedded shape by name (--miles-model-shape's values, dense or mixture-of-experts)."""
        from pytest_miles.models.moe import MoeConfig
        from pytest_miles.models.shapes import SHAPES

        if shape not in SHAPES:
            raise InputError(f"{WHERE}(model=): shape {shape!r} is not accepted; expected a ModelArgs or one "
                             f"of {', '.join(SHAPES)}")
        cfg = SHAPES[shape]
        make = cls.qwen3_moe if isinstance(cfg, MoeConfig) else cls.qwen2
        return make(cfg, seq_length=seq_length)

    @classmethod
    def qwen2(cls, cfg, *, seq_length: int | None = None, rotary_interleaved: bool = False) -> ModelArgs:
        """The same architecture as an HF Qwen2 config (a `TinyConfig`): RMSNorm, SwiGLU, GQA,
        bias on q/k/v only, RoPE, tied embeddings per config. On CPU megatron-core's RoPE runs
        through the worker's host subclass. `rotary_interleaved`: pairs (2i, 2i+1) rotate together
        (GPT-J style, what the embedded reference engine computes) instead of HF's halves."""
        return cls(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
                   ffn_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                   seq_length=seq_length or cfg.max_position_embeddings, position_embedding_type="rope",
                   normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, swiglu=True,
                   add_bias_linear=False, add_qkv_bias=True, kv_channels=cfg.head_dim, rotary_base=cfg.rope_theta,
                   rotary_interleaved=rotary_interleaved, tie_embeddings=cfg.tie_word_embeddings)


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """One training configuration, validated when built; `dataclasses.replace` re-validates."""

    seed: int = 1234
    """Megatron's seed (model init, dropout, data): an integer in [0, 2**32 - 1]."""
    model: ModelArgs | str = ModelArgs()
    """The architecture; `ModelArgs.qwen2(cfg)` for the Qwen2 shape of an HF config, or an embedded
    shape's name ("tiny-moe", "tiny", ...: `ModelArgs.of_shape`, sequences of 32 tokens)."""
    tensor_parallel: int = 1
    """Tensor-parallel size: >= 1, dividing the attention heads and the query groups."""
    world_size: int | None = None
    """Ranks in all (data parallel = world_size / tensor_parallel); None: tensor_parallel."""
    device: str = "cpu"
    """Where the ranks train: "cpu" (gloo) or "cuda" (NCCL)."""
    lr: float = 1e-3
    """Adam's learning rate: a finite number > 0."""
    micro_batch_size: int = 2
    """Sequences per micro-batch: >= 1."""
    deterministic: bool = True
    """Megatron's deterministic mode (and the deterministic environment in every rank)."""
    timeout: float = 600.0
    """Seconds a launch (or a session command) may take before its ranks are killed."""
    env: dict[str, str] | None = None
    """Extra environment for every rank (str -> str), over the deterministic environment."""
    transformer_impl: str = "local"
    """"local" (megatron-core's local spec, fp32, CPU or GPU) or "transformer_engine" (Miles' path)."""
    precision: str | None = None
    """The local spec: None or "fp32". TransformerEngine: bf16 (default), fp8_blockwise, mxfp8, nvfp4."""
    attention_backend: str | None = None
    """TransformerEngine only: unfused (default), fused, flash or auto."""
    data_seed_from_step: tuple[int, int] | None = None
    """(iteration >= 1, data seed): from that iteration on the tokens are drawn with that seed (a
    run that departs from its twin at a known iteration)."""
    log_dir: str | Path | None = None
    """Where rank logs and launch specs go; None: a fresh temporary folder."""
    python: str = sys.executable
    """The interpreter every rank runs."""
    resolved_precision: str = field(init=False, repr=False, compare=False)
    """The precision that trains: "fp32" on the local spec, the TransformerEngine default filled in."""
    resolved_attention_backend: str | None = field(init=False, repr=False, compare=False)
    """The TransformerEngine attention backend with its default filled in; None on the local spec."""

    def __post_init__(self) -> None:
        tp = v.integer(f"{WHERE}(tensor_parallel=)", self.tensor_parallel, minimum=1)
        v.integer(f"{WHERE}(seed=)", self.seed, minimum=0, maximum=2**32 - 1)
        if self.world_size is not None:
            ws = v.integer(f"{WHERE}(world_size=)", self.world_size, minimum=1)
            if ws % tp:
                raise InputError(f"{WHERE}(world_size=): world_size {ws} is not a multiple of "
                                 f"tensor_parallel {tp}")
        v.choice(f"{WHERE}(device=)", self.device, ("cpu", "cuda"))
        v.number(f"{WHERE}(lr=)", self.lr)
        v.integer(f"{WHERE}(micro_batch_size=)", self.micro_batch_size, minimum=1)
        v.boolean(f"{WHERE}(deterministic=)", self.deterministic)
        v.number(f"{WHERE}(timeout=)", self.timeout)
        self._check_env_and_model(tp)
        if self.data_seed_from_step is not None:
            object.__setattr__(self, "data_seed_from_step", _data_seed_from_step(self.data_seed_from_step))
        if self.log_dir is not None:
            v.path_like(f"{WHERE}(log_dir=)", self.log_dir)
        v.path_like(f"{WHERE}(python=)", self.python)
        precision, backend = resolve_te_options(self.transformer_impl, self.precision, self.attention_backend)
        object.__setattr__(self, "resolved_precision", precision)
        object.__setattr__(self, "resolved_attention_backend", backend)

    def _check_env_and_model(self, tp: int) -> None:
        env = self.env
        if env is not None and (not isinstance(env, dict) or
                                not all(isinstance(k, str) and isinstance(x, str) for k, x in env.items())):
            raise InputError(f"{WHERE}(env=): {env!r} is not accepted; expected a dict of str -> str")
        if env is not None:
            object.__setattr__(self, "env", dict(env))  # the caller's dict may change later; this may not
        m = self.model
        if isinstance(m, str):
            m = ModelArgs.of_shape(m)
            object.__setattr__(self, "model", m)
        if not isinstance(m, ModelArgs):
            raise InputError(f"{WHERE}(model=): {m!r} is not accepted; expected a "
                             "pytest_miles.trainers.megatron.ModelArgs or an embedded shape's name")
        if m.num_moe_experts and tp > 1:
            raise InputError(f"{WHERE}(tensor_parallel=): {tp} with a mixture-of-experts model is not wired here "
                             "(expert tensor parallelism); expected 1")
        if m.num_attention_heads % tp or (m.num_query_groups or m.num_attention_heads) % tp:
            raise InputError(f"{WHERE}(tensor_parallel=): tensor_parallel {tp} does not divide the attention "
                             f"heads ({m.num_attention_heads}) and query groups ({m.num_query_groups}) of the "
                             "model; expected a divisor of both")

    @property
    def world(self) -> int:
        """Ranks in all: world_size, or tensor_parallel when it is not given."""
        return self.world_size or self.tensor_parallel


def _data_seed_from_step(value: Any) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value) or value[0] < 1):
        raise InputError(f"{WHERE}(data_seed_from_step=): data_seed_from_step {value!r}: expected "
                         "(iteration >= 1, data seed), e.g. (3, 99)")
    return int(value[0]), int(value[1])


def config_from(config: TrainerConfig | None, fields: dict[str, Any]) -> TrainerConfig:
    """`config` with `fields` laid over it (or a fresh one from `fields`), validated once;
    an unknown field is a TypeError naming it and the accepted ones."""
    from dataclasses import fields as dc_fields
    from dataclasses import replace

    known = [f.name for f in dc_fields(TrainerConfig) if f.init]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise TypeError(f"{WHERE}(): unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(known)}, config, launcher, gpu_lease, hardware, pool")
    if config is None:
        return TrainerConfig(**fields)
    if not isinstance(config, TrainerConfig):
        raise InputError(f"{WHERE}(config=): {config!r} is not accepted; expected a "
                         "pytest_miles.trainers.config.TrainerConfig")
    return replace(config, **fields) if fields else config
