"""HF Qwen2 <-> megatron-core GPTModel state dicts (local and TransformerEngine layer specs).

Pure tensor reshuffling, no arithmetic: a round trip is bitwise. Used by the RL loop (weights
from the trainer to the engine) and by the precision cells (one converter for both).
"""

from __future__ import annotations

from .qwen2 import ConvertError, QwenShape, hf_to_megatron, megatron_to_hf

__all__ = ["ConvertError", "QwenShape", "hf_to_megatron", "megatron_to_hf"]
