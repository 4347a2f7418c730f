"""SGLang's tensor dump read as the divergence locator's records, on CPU: files in the layout SGLang
0.5.17's dumper writes, made from the reference engine's own per-layer records, go through the real
reader (safe file door, restricted unpickler) and come back as the same records under the same
names, bit for bit; the right pass is picked among warm-up, decode and other ranks' files; a
chunked prefill is joined; a hostile file is refused without running anything. The dump engine's
command line is checked without starting it (SGLang itself runs in tests/gpu/test_gpu_parity.py)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

from pytest_miles.engines.base import EngineError  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.engines.sglang_dump import FOLDER_FLAG, SGLangDumpEngine, pass_files, read_points  # noqa: E402
from pytest_miles.errors import InputError, MilesError  # noqa: E402
from pytest_miles.models.embedded import TinyConfig, write_hf_checkpoint  # noqa: E402
from tests.helpers.sglang_dump import sglang_pass, sliced, write_pass  # noqa: E402

TOKENS = [5, 17, 99, 3, 44, 8, 301, 77, 12]
LAYERS = TinyConfig().num_hidden_layers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", dtype="float32")


@pytest.fixture(scope="module")
def records(model_dir):
    with ReferenceEngine(model_dir, deterministic=True) as e:
        return e.hidden_states(TOKENS), e.hidden_states([1, 2, 3])


def test_the_prefill_pass_reads_back_as_the_reference_records(records, tmp_path):
    import torch

    ours, warm = records
    write_pass(tmp_path, 0, sglang_pass(warm, [1, 2, 3], LAYERS))  # another request's pass
    write_pass(tmp_path, 1, sglang_pass(ours, TOKENS, LAYERS, previous=warm))
    write_pass(tmp_path, 2, sglang_pass(sliced(ours, -1), [TOKENS[-1]], LAYERS, previous=ours))  # a decode step
    write_pass(tmp_path, 0, sglang_pass(warm, [1, 2, 3], LAYERS), tp=1)  # tensor-parallel rank 1: not read
    got = read_points(tmp_path, TOKENS, num_layers=LAYERS, wait=0)
    assert set(got) == set(ours) - {"logits"}, sorted(got)  # every point but the logits (last position only)
    for name, value in got.items():
        assert torch.equal(value, ours[name]), name
    # the fused residual: layer 0's output is layer 1's input norm's residual, the last layer's the final norm's
    assert torch.equal(got["layers.0.output"], ours["layers.0.output"]) and len(pass_files(tmp_path)) == 3


def test_a_chunked_prefill_is_joined_and_old_passes_skipped(records, tmp_path):
    import torch

    ours, _ = records
    first = write_pass(tmp_path, 0, sglang_pass(sliced(ours, 0, 5), TOKENS[:5], LAYERS))
    second = write_pass(tmp_path, 1, sglang_pass(sliced(ours, 5), TOKENS[5:], LAYERS))
    got = read_points(tmp_path, TOKENS, num_layers=LAYERS, wait=0)
    assert all(torch.equal(v, ours[k]) for k, v in got.items()) and len(got) == len(ours) - 1
    with pytest.raises(EngineError, match=r"no forward pass of the 9 requested tokens \(new pass files and their "
                                          r"token counts: \{'Pass00001.pt': 4\}\)"):
        read_points(tmp_path, TOKENS, skip={first}, wait=0)
    with pytest.raises(EngineError, match="token counts: none"):
        read_points(tmp_path, TOKENS, skip={first, second}, wait=0)


def test_a_pass_file_still_being_written_is_waited_for_not_misread(records, tmp_path):
    ours, warm = records
    write_pass(tmp_path, 0, sglang_pass(ours, TOKENS, LAYERS))
    later = write_pass(tmp_path, 1, sglang_pass(warm, [1, 2, 3], LAYERS))
    later.write_bytes(later.read_bytes()[:300])  # torch.save half way through the next pass
    assert len(read_points(tmp_path, TOKENS, num_layers=LAYERS, wait=0)) == len(ours) - 1
    with pytest.raises(MilesError, match="Pass00001.pt"):  # a damaged file before the newest is named
        write_pass(tmp_path, 2, sglang_pass(warm, [1, 2, 3], LAYERS))
        read_points(tmp_path, TOKENS, num_layers=LAYERS, wait=0)


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_hostile_dump_file_is_refused_without_running_it(tmp_path):
    import torch

    marker = tmp_path / "ran"
    write_pass(tmp_path / "dump", 0, {"model.forward_batch_info.input_ids": torch.tensor([1]),
                                      "model.embed_tokens": _Planted(str(marker))})
    with pytest.raises(MilesError, match="refused|not allowed|unsafe|forbidden"):
        read_points(tmp_path / "dump", [1], wait=0)
    assert not marker.exists()


def test_the_dump_engine_command_line(model_dir):
    eng = SGLangDumpEngine(model_dir, port=1, python="python-not-started")
    try:
        i = eng.cmd.index(FOLDER_FLAG)
        assert eng.cmd[i + 1] == str(eng.dump_dir) and eng.dump_dir.is_dir() and "--disable-radix-cache" in eng.cmd
        assert eng.num_layers == LAYERS and eng.name == "sglang-dump" and hasattr(eng, "hidden_states")
    finally:
        eng.close()
    assert not eng.dump_dir.exists()  # the folder it made is removed with it
    with pytest.raises(InputError, match="debug-tensor-dump-layers is set by the engine itself"):
        SGLangDumpEngine(model_dir, port=1, extra_args=["--sglang-debug-tensor-dump-layers", "0"])
    with pytest.raises(InputError, match=r"hidden_states\(tokens\)"):
        eng.hidden_states([])


def test_dump_hidden_states_is_an_sglang_option(model_dir, tmp_path):
    from pytest_miles.engines.launch import EngineSpec

    def spec(kind, value):
        return EngineSpec(kind, str(model_dir), True, "flashinfer", (), {"dump_hidden_states": value}, "cpu",
                          str(tmp_path), 10.0)

    assert spec("sglang", True).options["dump_hidden_states"] is True
    with pytest.raises(InputError, match=r"dump_hidden_states=\): 'yes' is not accepted"):
        spec("sglang", "yes")
    with pytest.raises(InputError, match="an option of the SGLang engines"):
        spec("reference", True)
    with pytest.raises(InputError, match=r"dump_dir=\): the tensor dump's folder, accepted only with"):
        EngineSpec("sglang", str(model_dir), True, "flashinfer", (), {"dump_dir": str(tmp_path)}, "cpu",
                   str(tmp_path), 10.0)
