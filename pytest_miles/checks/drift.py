"""Training-inference logprob drift of a precision cell, as Miles measures it:
`train_rollout_logprob_abs_diff` = masked mean |logp_train - logp_rollout| (plus max and KL).

The same tiny seeded model scores the same tokens twice: once as the rollout path, once as the
training path, each with its cell's quantization of weights (and of activations, per 1x128
tile for FP8 block-wise, 1x32 for MXFP8, 1x16 for NVFP4, as the recipes do). A unified cell
runs the same kernels on both sides, so its drift is exactly 0.0; a mixed cell (BF16 train +
FP8 rollout) drifts. `gemm="scaled_mm"` runs the FP8 block-wise paths through real FP8 GEMMs
(torch._scaled_mm, Hopper and newer) instead of dequantize-then-BF16-matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pytest_miles.facts.precision import validate_precision_config
from pytest_miles.models.embedded import TinyConfig, TinyDecoder, init_weights
from pytest_miles.models.quantize import fake_quant
from pytest_miles.recording import recorded

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight", "lm_head.weight")


@dataclass
class DriftReport:
    rollout: str
    train: str
    train_rollout_logprob_abs_diff: float
    max_abs_diff: float
    kl: float
    tokens: int
    gemm: str = "reference"

    def render(self) -> str:
        return (f"rollout={self.rollout} train={self.train} [{self.gemm}]: train_rollout_logprob_abs_diff "
                f"{self.train_rollout_logprob_abs_diff:.6g}, max {self.max_abs_diff:.6g}, KL {self.kl:.6g} "
                f"over {self.tokens} tokens")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _act_quant(fmt: str, gemm: str):
    if fmt == "bf16":
        return None
    tile = {"fp8_blockwise": 128, "mxfp8": 32, "nvfp4": 16}[fmt]

    def quant(x):
        import torch

        from pytest_miles.models.quantize import QUANTIZERS, dequantize

        flat = x.reshape(-1, x.shape[-1]).float()
        block = (1, tile) if fmt == "fp8_blockwise" else None
        q = QUANTIZERS[fmt](flat, block) if block else QUANTIZERS[fmt](flat, tile)
        return dequantize(q).reshape(x.shape).to(torch.bfloat16)

    return quant


class _ScaledMMDecoder(TinyDecoder):
    """FP8 block-wise linears as real FP8 GEMMs: activations 1x128, weights 128x128, one
    torch._scaled_mm per 128-wide K block, scales applied to its FP32 partial product."""

    def __init__(self, cfg, state, device, qweights):
        import torch

        super().__init__(cfg, state, device=device, dtype=torch.bfloat16)
        self.qweights = qweights  # id(weight tensor) -> Quantized

    def _lin(self, x, weight):
        import torch

        from pytest_miles.models.quantize import quantize_fp8_blockwise

        qw = self.qweights[id(weight)]
        shape = x.shape
        a = x.reshape(-1, shape[-1]).float()
        qa = quantize_fp8_blockwise(a, (1, 128))
        m, k = a.shape
        n = weight.shape[0]
        av = qa.values.reshape(m, -1)  # [m, K] fp8 (K padded to 128)
        wv = qw.values.reshape(qw.values.shape[0] * 128, -1)  # [N padded, K padded]
        out = torch.zeros(m, wv.shape[0], dtype=torch.float32, device=a.device)
        one = torch.ones((), dtype=torch.float32, device=a.device)
        for kb in range(av.shape[1] // 128):
            part = torch._scaled_mm(av[:, kb * 128:(kb + 1) * 128].contiguous(),
                                    wv[:, kb * 128:(kb + 1) * 128].t(), one, one, out_dtype=torch.float32)
            sa = qa.scales[:, kb][:, None]  # [m, 1]
            sw = qw.scales[:, kb].repeat_interleave(128)[None, : wv.shape[0]]  # [1, N]
            out += part * sa * sw
        return out[:, :n].to(torch.bfloat16).reshape(*shape[:-1], n)


def _path(cfg: TinyConfig, weights: dict, fmt: str, device: str, gemm: str) -> TinyDecoder:
    import torch

    if gemm == "scaled_mm" and fmt == "fp8_blockwise":
        from pytest_miles.models.quantize import quantize_fp8_blockwise

        state = {k: v.to(torch.bfloat16) for k, v in weights.items()}
        model = _ScaledMMDecoder(cfg, state, device, {})
        for k, v in model.w.items():
            if k.endswith(LINEAR_SUFFIXES):
                model.qweights[id(v)] = quantize_fp8_blockwise(v.float())
        return model
    state = {k: (fake_quant(v, fmt) if k.endswith(LINEAR_SUFFIXES) else v.to(torch.bfloat16))
             for k, v in weights.items()}
    return TinyDecoder(cfg, state, device=device, dtype=torch.bfloat16, act_quant=_act_quant(fmt, gemm))


def measure_logprob_drift(rollout: str, train: str, *, gpu=None, config: TinyConfig | None = None,
                          batch: int = 4, seq_len: int = 64, seed: int = 0, device: str = "cpu",
                          gemm: str = "reference") -> DriftReport:
    """Score the same seeded tokens on the rollout path and the training path of a cell."""
    validate_precision_config(rollout, train, gpu)  # before importing torch: a bad name fails at once
    import torch

    config = config or TinyConfig()
    if gemm not in ("reference", "scaled_mm"):
        raise ValueError(f"gemm: {gemm!r} is not one of reference, scaled_mm")
    weights = init_weights(config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=g).to(device)
    pos = torch.arange(seq_len, device=device)[None].expand(batch, seq_len)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    logp = {}
    with torch.no_grad():
        for side, fmt in (("rollout", rollout), ("train", train)):
            model = _path(config, weights, fmt, device, gemm)
            logits, _ = model.step(ids, pos, mask, all_logits=True)
            logp[side] = torch.log_softmax(logits.float()[:, :-1], dim=-1)
    target = ids[:, 1:, None]
    lr = logp["rollout"].gather(-1, target).squeeze(-1)
    lt = logp["train"].gather(-1, target).squeeze(-1)
    diff = (lt - lr).abs()
    kl = (logp["rollout"].exp() * (logp["rollout"] - logp["train"])).sum(-1).mean()
    return DriftReport(rollout, train, float(diff.mean()), float(diff.max()), float(kl), int(diff.numel()), gemm)


@recorded("logprob drift")
def assert_logprob_drift(rollout: str, train: str, *, max_abs_diff: float | None = None, **kwargs: Any) -> DriftReport:
    """Unified cells must drift exactly 0.0; others must stay under `max_abs_diff` when given."""
    if max_abs_diff is not None:  # NaN would make every comparison false: the check would pass vacuously
        from pytest_miles.validation import number

        number("assert_logprob_drift(max_abs_diff=)", max_abs_diff, allow_zero=True)
    report = measure_logprob_drift(rollout, train, **kwargs)
    if rollout == train and report.train_rollout_logprob_abs_diff != 0.0:
        raise AssertionError(f"unified cell drifts although both paths run the same kernels: {report.render()}")
    if max_abs_diff is not None and report.train_rollout_logprob_abs_diff > max_abs_diff:
        raise AssertionError(f"drift above {max_abs_diff}: {report.render()}")
    return report
