"""Checks compare artefacts (checkpoints, token ids, logprobs, runs) and produce reports.

They never launch anything. Each `assert_*` raises `AssertionError` with the full report, so
it works under `python -O` and outside pytest's assertion rewriting.
"""
