"""The embedded engines' sampler (greedy, temperature, top-k, top-p, min-p; one seeded generator per
request), shared by the batched engine and the scheduler."""

from __future__ import annotations

from pytest_miles.engines.base import SamplingParams

# SGLang 0.5.17 (sglang/srt/sampling/sampling_params.py:39, :144): a temperature below 1e-6 is greedy (top_k 1);
# dividing by it would overflow the logits to inf and the sampler's probabilities to NaN.
SAMPLING_EPS = 1e-6


def _sample(logits, params: SamplingParams, gen) -> int:
    import torch

    if params.temperature < SAMPLING_EPS:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0:
        kth = torch.topk(probs, min(params.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    if params.min_p > 0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
