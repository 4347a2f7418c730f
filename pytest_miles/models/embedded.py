"""The embedded tiny model: a Qwen2-style decoder (RMSNorm, RoPE, GQA, SwiGLU) built from a
config and a seed, in plain torch, and written as an HF checkpoint SGLang can load.

Nothing is downloaded: weights come from `torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pytest_miles.models.tokenizer_vocab import write_tokenizer  # noqa: F401  (importable here too)


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512
    hidden_size: int = 128  # head_dim 64: what GPU attention kernels (flashinfer, triton) support
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    seed: int = 1234
    tie_word_embeddings: bool = False  # True: the output layer is the embedding (no lm_head.weight)

    def __post_init__(self) -> None:
        from pytest_miles.models.config_fields import check_fields

        check_fields(self)
        if self.hidden_size % self.num_attention_heads:
            from pytest_miles.errors import InputError

            raise InputError(f"model config: hidden_size ({self.hidden_size}) is not a multiple of "
                             f"num_attention_heads ({self.num_attention_heads}); the head size must be whole")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self, dtype: str = "bfloat16") -> dict:
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": dtype,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu", "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": self.num_hidden_layers,
            "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
            "use_cache": True,
        }


def is_tiny(cfg: TinyConfig) -> bool:
    """The default tiny shape, whatever its seed: the one shape with the original init."""
    return replace(cfg, seed=TinyConfig.seed) == TinyConfig()


def init_weights(cfg: TinyConfig) -> dict:
    """HF (Qwen2) parameter names -> fp32 tensors, from the seed alone.

    The default tiny shape (any seed) keeps its original init, which the committed snapshots
    record. Every other shape gets the streamed writer's values (`tensor_chunks`: 1/sqrt(fan_in)
    linears, embedding std 0.05), so that one shape has one set of weights however it is written,
    and its logits stay in a trained model's range: the tiny init's scales (linears 0.08, tied
    embedding std 1) give the 0.5B shape logits of std ~30, where any rounding flips the sampled
    token and a precision figure measures that chaos, not the precision (H100, 2026-11-23:
    FP8 x bf16 44 nats end to end, 18.9 in process)."""
    import torch

    if not is_tiny(cfg):
        return {name: torch.cat(list(tensor_chunks(cfg, name, shape)))
                for name, shape in tensor_specs(cfg).items()}
    g = torch.Generator().manual_seed(cfg.seed)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

    def w(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": w(cfg.vocab_size, h, scale=1.0)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        sd[f"{p}.input_layernorm.weight"] = 1 + 0.1 * w(h, scale=1.0)
        sd[f"{p}.self_attn.q_proj.weight"] = w(q, h)
        sd[f"{p}.self_attn.q_proj.bias"] = w(q, scale=0.02)
        sd[f"{p}.self_attn.k_proj.weight"] = w(kv, h)
        sd[f"{p}.self_attn.k_proj.bias"] = w(kv, scale=0.02)
        sd[f"{p}.self_attn.v_proj.weight"] = w(kv, h)
        sd[f"{p}.self_attn.v_proj.bias"] = w(kv, scale=0.02)
        sd[f"{p}.self_attn.o_proj.weight"] = w(h, q)
        sd[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * w(h, scale=1.0)
        sd[f"{p}.mlp.gate_proj.weight"] = w(i, h)
        sd[f"{p}.mlp.up_proj.weight"] = w(i, h)
        sd[f"{p}.mlp.down_proj.weight"] = w(h, i)
    sd["model.norm.weight"] = 1 + 0.1 * w(h, scale=1.0)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = w(cfg.vocab_size, h, scale=0.5)
    return sd


# Embedded shapes (--miles-model-shape). tiny: the default, cheap everywhere (its weights come from
# init_weights and are what the committed snapshots record). tiny128: every dim a multiple of 128
# (head_dim 128, KV projection 128 wide) for kernels with 128-wide tiles (FP8 block scales).
# qwen2.5-0.5b: Qwen2.5-0.5B's shape (the quick-start model of the Miles guides), big enough for GEMM and
# attention reductions to vary with the batch (the tiny model hides batch variance).
SHAPES: dict[str, TinyConfig] = {
    "tiny": TinyConfig(),
    "tiny128": TinyConfig(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1),
    "qwen2.5-0.5b": TinyConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def tensor_specs(cfg: TinyConfig) -> dict[str, tuple[int, ...]]:
    """HF (Qwen2) parameter names -> shapes, in file order (no lm_head when embeddings are tied)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    specs: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        specs.update({f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (q, h),
                      f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.weight": (kv, h),
                      f"{p}.self_attn.k_proj.bias": (kv,), f"{p}.self_attn.v_proj.weight": (kv, h),
                      f"{p}.self_attn.v_proj.bias": (kv,), f"{p}.self_attn.o_proj.weight": (h, q),
                      f"{p}.post_attention_layernorm.weight": (h,), f"{p}.mlp.gate_proj.weight": (i, h),
                      f"{p}.mlp.up_proj.weight": (i, h), f"{p}.mlp.down_proj.weight": (h, i)})
    specs["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = (cfg.vocab_size, h)
    return specs


def tensor_chunks(cfg: TinyConfig, name: str, shape: tuple[int, ...], rows: int = 8192):
    """One tensor's fp32 values in row chunks, from a generator seeded by (seed, name) alone, so
    any tensor can be made (or re-made, in a test) without the others, and RAM stays at a chunk."""
    import hashlib

    import torch

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{cfg.seed}:{name}".encode()).digest()[:8],
                                                     "little") & (2**63 - 1))
    if name.endswith("norm.weight"):
        yield 1 + 0.1 * torch.randn(shape, generator=g)
        return
    if name.endswith(".bias"):
        yield 0.02 * torch.randn(shape, generator=g)
        return
    scale = 0.05 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5  # 1/sqrt(fan_in)
    for start in range(0, shape[0], rows):
        yield scale * torch.randn((min(rows, shape[0] - start),) + tuple(shape[1:]), generator=g)


def write_streamed_safetensors(file: str | Path, cfg: TinyConfig, dtype: str = "bfloat16", specs=None) -> Path:
    """model.safetensors written tensor by tensor (header first, then each chunk): a 0.5B-parameter
    shape in a few seconds without holding its weights in memory."""
    import torch

    tdt = getattr(torch, dtype)
    code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    size = tdt.itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    specs = tensor_specs(cfg) if specs is None else specs
    for name, shape in specs.items():
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n * size]}
        offset += n * size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    file = Path(file)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in specs.items():
            for chunk in tensor_chunks(cfg, name, shape):
                f.write(chunk.to(tdt).contiguous().view(torch.uint8).numpy().tobytes())
    return file


def write_hf_checkpoint(path: str | Path, cfg: TinyConfig = TinyConfig(), dtype: str = "bfloat16",
                        tokenizer: bool = False) -> Path:
    """config.json + model.safetensors; drive it with token ids, or with text when `tokenizer`.
    The values are `init_weights(cfg)`'s; every shape but tiny is written tensor by tensor, chunk by
    chunk."""
    if not is_tiny(cfg):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_streamed_safetensors(path / "model.safetensors", cfg, dtype)
        (path / "config.json").write_text(json.dumps(cfg.hf_config(dtype), indent=1))
    else:
        path = save_hf_weights(path, init_weights(cfg), cfg, dtype)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (path / "pytest_miles_model.json").write_text(json.dumps(asdict(cfg)))
    if tokenizer:
        write_tokenizer(path, cfg.vocab_size)
    return path


def save_hf_weights(path: str | Path, state: dict, cfg: TinyConfig, dtype: str = "bfloat16") -> Path:
    """An HF state dict -> model.safetensors + config.json (written last, so a reader that sees
    the config sees the weights): what a trainer exports for an engine's weight update."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in state.items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg.hf_config(dtype), indent=1))
    return path


def load_safetensors_dir(path: str | Path) -> dict:
    """Every tensor of an HF dir's *.safetensors, in file order ({} when it has none: each caller
    says what it expected). Safetensors only: nothing is unpickled; each file must be a regular
    file (else CheckpointError naming it: a FIFO is never opened blocking); an unreadable one is a
    ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pytest_miles._files import SafeFile

    state: dict = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        SafeFile(f).close()  # a regular file, or a CheckpointError naming what it is
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{f}: not a readable safetensors file ({exc})") from None
    return state


def write_shape(path: str | Path, shape: str, dtype: str = "bfloat16") -> Path:
    """The embedded model of this shape (see SHAPES) as an HF checkpoint."""
    if shape not in SHAPES:
        raise ValueError(f"model shape {shape!r}: expected one of {', '.join(SHAPES)}")
    return write_hf_checkpoint(path, SHAPES[shape], dtype)


def read_hf_config(path: str | Path) -> dict:
    """An HF model directory's config.json as a dict. A regular file only (a FIFO is refused by
    name, never opened blocking); FileNotFoundError where there is none; ValueError naming the
    file for anything else that is not a JSON object."""
    import os

    from pytest_miles._files import CheckpointError, read_text

    p = Path(path) / "config.json"
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p}: no config.json in the model directory")
    try:
        raw = json.loads(read_text(p, what="config.json"))
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a JSON {type(raw).__name__}, not an object")
    return raw


def config_from_hf(raw: dict, where: str | Path = "config.json") -> TinyConfig:
    """An HF Qwen2-style config (read_hf_config's dict) as a TinyConfig; InputError (a ValueError) naming `where`."""
    from pytest_miles.errors import InputError

    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        return TinyConfig(**{k: raw[k] for k in TinyConfig.__dataclass_fields__ if k in raw})
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def config_from_dir(path: str | Path) -> TinyConfig:
    """Read an HF Qwen2-style config.json into a TinyConfig (the reference engine's shapes)."""
    return config_from_hf(read_hf_config(path), Path(path) / "config.json")


class TinyDecoder:
    """Functional forward over a state dict, with a KV cache (`step`)."""

    def __init__(self, cfg: TinyConfig, state: dict, device: str = "cpu", dtype=None, act_quant=None) -> None:
        import torch

        self.cfg = cfg
        self.act_quant = act_quant  # applied to every linear layer's input (FP8 recipes quantize activations)
        self.trace = None  # (name, tensor [B, S, H]) per layer point when set: the divergence locator's records
        self.dtype = dtype or torch.float32
        self.w = {k: v.to(device=device, dtype=self.dtype) for k, v in state.items()}
        self.device = device
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        self.cos = freqs.cos().to(device=device, dtype=self.dtype)
        self.sin = freqs.sin().to(device=device, dtype=self.dtype)

    def _lin(self, x, weight):
        return (self.act_quant(x) if self.act_quant is not None else x) @ weight.T

    def _rms(self, x, weight):
        import torch

        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.cfg.rms_norm_eps)).to(self.dtype) * weight

    def _rope(self, x, positions):
        import torch

        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B,1,T,d/2]
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def _qkv(self, p: str, hsn, b: int, s_new: int):
        """q, k, v of one layer as [B, S, heads, d] (Qwen2: biased projections)."""
        w, cfg, d = self.w, self.cfg, self.cfg.head_dim
        q = (self._lin(hsn, w[f"{p}.self_attn.q_proj.weight"]) + w[f"{p}.self_attn.q_proj.bias"])
        k = (self._lin(hsn, w[f"{p}.self_attn.k_proj.weight"]) + w[f"{p}.self_attn.k_proj.bias"])
        v = (self._lin(hsn, w[f"{p}.self_attn.v_proj.weight"]) + w[f"{p}.self_attn.v_proj.bias"])
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        return q.view(b, s_new, nh, d), k.view(b, s_new, nkv, d), v.view(b, s_new, nkv, d)

    def _mlp(self, n: int, hsn, positions):
        """Layer n's feed-forward block (Qwen2: one SwiGLU MLP)."""
        w, p = self.w, f"model.layers.{n}"
        gate = self._act(self._lin(hsn, w[f"{p}.mlp.gate_proj.weight"]))
        return self._lin(gate * self._lin(hsn, w[f"{p}.mlp.up_proj.weight"]), w[f"{p}.mlp.down_proj.weight"])

    @staticmethod
    def _act(x):
        import torch

        return torch.nn.functional.silu(x)

    def step(self, ids, positions, key_mask, cache=None, all_logits: bool = False):
        """Process S new positions per item against a KV cache, as a serving engine does.

        ids, positions: [B, S]; key_mask: [B, L + S] (True = real token, L = cached length);
        cache: per layer (k, v) of [B, kv_heads, L, d] or None. Returns (logits, cache):
        logits [B, S, V] if all_logits else [B, V] for the last position (what engines compute).
        """
        import torch

        cfg, w = self.cfg, self.w
        b, s_new = ids.shape
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cached = 0 if cache is None else cache[0][0].shape[2]
        total = cached + s_new
        q_pos = cached + torch.arange(s_new, device=ids.device)
        causal = torch.arange(total, device=ids.device)[None, :] <= q_pos[:, None]  # [S, L+S]
        allowed = causal[None] & key_mask.bool()[:, None, :]
        bias = torch.zeros(b, 1, s_new, total, dtype=self.dtype, device=ids.device)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        x = w["model.embed_tokens.weight"][ids]
        t = self.trace or (lambda name, value: None)
        t("embedding", x)
        new_cache = []
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}"
            hsn = self._rms(x, w[f"{p}.input_layernorm.weight"])
            t(f"layers.{n}.input_norm", hsn)
            q, k, v = (y.transpose(1, 2) for y in self._qkv(p, hsn, b, s_new))
            q, k = self._rope(q, positions), self._rope(k, positions)
            if cache is not None:
                k = torch.cat((cache[n][0], k), dim=2)
                v = torch.cat((cache[n][1], v), dim=2)
            new_cache.append((k, v))
            kr, vr = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            scores = (q @ kr.transpose(-1, -2)) / d**0.5 + bias
            probs = torch.nan_to_num(torch.softmax(scores.float(), dim=-1)).to(self.dtype)
            att = (probs @ vr).transpose(1, 2).reshape(b, s_new, nh * d)
            att = self._lin(att, w[f"{p}.self_attn.o_proj.weight"])
            t(f"layers.{n}.attention", att)
            x = x + att
            hsn = self._rms(x, w[f"{p}.post_attention_layernorm.weight"])
            t(f"layers.{n}.post_attention_norm", hsn)
            mlp = self._mlp(n, hsn, positions)
            t(f"layers.{n}.mlp", mlp)
            x = x + mlp
            t(f"layers.{n}.output", x)
        if not all_logits:
            x = x[:, -1]
        x = self._rms(x, w["model.norm.weight"])
        t("final_norm", x)
        head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        return self._lin(x, head).float(), new_cache
