"""Embedded seeded models and their shapes, HF checkpoint I/O, the HF<->Megatron converter and the
reference quantizers (floor 1)."""
