"""The deterministic chunked-prefill check: which configurations SGLang would serve and which would
starve every prompt longer than the chunk (sgl-project/sglang#36344)."""

from __future__ import annotations

import pytest

from pytest_miles.engines.sglang_chunking import aligned_env, check_deterministic_chunking, chunk_size
from pytest_miles.errors import InputError

SERVED = [  # (deterministic, backend, args, env)
    (True, "flashinfer", ("--chunked-prefill-size", "4096"), {}),
    (True, "triton", ("--chunked-prefill-size", "8192"), {}),
    (True, "flashinfer", ("--chunked-prefill-size", "-1"), {}),  # chunked prefill off
    (True, "flashinfer", (), {}),  # SGLang's own default chunk
    (False, "flashinfer", ("--chunked-prefill-size", "32"), {}),  # no alignment without determinism
    (True, "fa3", ("--chunked-prefill-size", "32"), {}),  # a backend without an alignment in 0.5.17
    (True, "triton", ("--chunked-prefill-size", "64"), aligned_env("triton", 64)),
    (True, "flashinfer", ("--chunked-prefill-size=128",), aligned_env("flashinfer", 128)),
    (True, "flashinfer", ("--chunked-prefill-size", "256"), {"SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE": "128"}),
]


@pytest.mark.parametrize(("deterministic", "backend", "args", "env"), SERVED)
def test_configurations_sglang_serves_pass(deterministic, backend, args, env):
    check_deterministic_chunking(deterministic, backend, args, env, version="0.5.17")


def test_triton_has_no_alignment_from_0_5_22_flashinfer_keeps_its_own():
    small = ("--chunked-prefill-size", "128")
    check_deterministic_chunking(True, "triton", small, {}, version="0.5.22")
    check_deterministic_chunking(True, "triton", small, {}, version="0.5.23.post1")
    for version in ("0.5.21", None):  # None: an unknown version is taken to have the alignment
        with pytest.raises(InputError):
            check_deterministic_chunking(True, "triton", small, {}, version=version)
    with pytest.raises(InputError):
        check_deterministic_chunking(True, "flashinfer", small, {}, version="0.5.23")


@pytest.mark.parametrize(("backend", "args", "env", "align"), [
    ("flashinfer", ("--chunked-prefill-size", "512"), {}, "SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE=4096"),
    ("triton", ("--sglang-chunked-prefill-size", "128"), {}, "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE=4096"),
    ("triton", ("--chunked-prefill-size", "4096", "--chunked-prefill-size", "64"), {}, "=4096"),  # the last wins
    ("flashinfer", ("--chunked-prefill-size", "64"), {"SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE": "128"}, "=128"),
])
def test_a_chunk_below_the_alignment_is_refused_naming_the_way_out(backend, args, env, align):
    with pytest.raises(InputError) as info:
        check_deterministic_chunking(True, backend, args, env, version="0.5.17")
    msg = str(info.value)
    assert align in msg and "wait forever" in msg and "Accepted:" in msg and "sgl-project/sglang#36344" in msg


def test_chunk_size_reads_every_spelling_and_the_last_wins():
    assert chunk_size(()) is None
    assert chunk_size(("--chunked-prefill-size", "64", "--sglang-chunked-prefill-size=128")) == 128
    with pytest.raises(InputError, match="'' is not an integer"):
        chunk_size(("--chunked-prefill-size",))


def test_the_factory_refuses_before_starting_anything(tmp_path):
    from pytest_miles.engines.factory import EngineFactory

    (tmp_path / "config.json").write_text("{}")
    factory = EngineFactory(model_dir=lambda: str(tmp_path), log_dir=tmp_path, hardware=lambda: None, device="cpu")
    with pytest.raises(InputError, match="--chunked-prefill-size 32"):
        factory("sglang", attention_backend="triton", extra_args=("--chunked-prefill-size", "32"))
    assert factory.launches == 0 and not factory.live


def test_flags_are_read_as_argparse_reads_them():
    from pytest_miles.engines.base import flag_values, sglang_arg

    args = ("--tp", "2", "--dtype=half", "--sglang-dtype", "bf16", "--tp")
    assert flag_values(args, ("--tp",)) == [("--tp", "2"), ("--tp", None)]  # the last one has no value
    assert sglang_arg(args, "dtype") == "bf16"  # Miles' --sglang- spelling too, the last one winning
    assert sglang_arg(args, "tp") == "2"
    assert sglang_arg(args, "kv-cache-dtype") is None
