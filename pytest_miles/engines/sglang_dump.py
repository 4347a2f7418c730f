"""SGLang's per-layer hidden states for the divergence locator, read from its debug tensor dump.

Why the dump and not `--enable-return-hidden-states`: that returns one point, the final hidden
state (after the final norm, or before it where the model hands that over), never the layers
(sglang 0.5.17 `layers/logits_processor.py:654-709`). The dump (`--debug-tensor-dump-output-folder`,
0.5.17 `debug_utils/tensor_dump_forward_hook.py`) hooks every leaf module of the model plus the
top-level `model` (lines 113-124: `self_attn` and `mlp` have children, so their last leaves,
`o_proj` and `down_proj`, stand for them) and writes, per rank and per forward pass, one `torch.save` file
`<folder>/TP{tp}_PP{pp}_Rank{rank}_pid{pid}/Pass{n:05d}.pt` (lines 40-44, 81-85): a dict of module
name -> output moved to the CPU (a tensor; a list when the module returned several, None dropped:
lines 49-55), plus `model.forward_batch_info.{input_ids,seq_lens,positions}` of that pass (60-69).
The file is written when the top-level `model`'s hook fires (127-136), so a pass file holds that
pass's layers and the PREVIOUS pass's `model` output and logits: only the layer keys are read.

SGLang's decoder layer returns (hidden, residual) apart and adds them inside the next RMSNorm
(fused add: `RMSNorm(x, residual)` -> (norm(x + residual), x + residual)). Compared, per layer N:
  input_norm          <- model.layers.N.input_layernorm output [0] (the tensor itself for layer 0)
  attention           <- model.layers.N.self_attn.o_proj (attention output before the residual add)
  post_attention_norm <- model.layers.N.post_attention_layernorm output [0]
  mlp                 <- model.layers.N.mlp.down_proj (dense MLPs; a MoE block has no leaf output)
  output              <- hidden + residual: layer N+1's input_layernorm output [1], and for the
                         last layer the final norm's [1] (what HF and megatron-core call the layer output)
  embedding <- model.embed_tokens; final_norm <- model.norm output [0]. Not compared: logits (the
  dump holds only the last position's, in the next pass's file).
Setting the folder turns CUDA graphs and the server warm-up off (0.5.17 `server_args.py:8119-8126`),
so `--debug-tensor-dump-input-file` (used only by that warm-up, `entrypoints/http_server.py:2266`)
never runs: the prefill is our own request. The radix cache is turned off on the dump engine so the
pass holds every token (a prefix hit would prefill only the suffix); a chunked prefill spans passes,
which are joined in order. Tensor-parallel ranks hold the same full outputs: rank TP0 is read.
Engines produce these records; checks.locate compares them."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_miles.engines.base import EngineError
from pytest_miles.engines.server import SGLangEngine
from pytest_miles.engines.sglang_offline import SGLangOfflineEngine
from pytest_miles.errors import CheckpointError, InputError

FOLDER_FLAG = "--debug-tensor-dump-output-folder"
LAYERS_FLAG = "--debug-tensor-dump-layers"
RANK_DIR = re.compile(r"^TP(\d+)_PP(\d+)_Rank(\d+)_pid(\d+)$")
PASS_FILE = re.compile(r"^Pass(\d+)\.pt$")
INPUT_IDS = "model.forward_batch_info.input_ids"
_LEAF = re.compile(r"^model\.layers\.(\d+)\."
                   r"(input_layernorm|self_attn\.o_proj|post_attention_layernorm|mlp\.down_proj)$")
PROBE = {"max_new_tokens": 1, "temperature": 0.0}  # one prefill of the given ids (and at most one token)


def dump_args(folder: str | Path) -> list[str]:
    """The SGLang arguments of a dump engine (0.5.17 `server_args.py:3309-3324`, `:923`)."""
    return [FOLDER_FLAG, str(folder), "--disable-radix-cache"]


def pass_files(folder: str | Path) -> list[Path]:
    """The pass files of tensor-parallel rank 0 of every pipeline stage, in (stage, pass) order."""
    found = []
    for d in Path(folder).iterdir() if Path(folder).is_dir() else ():
        m = RANK_DIR.match(d.name)
        if m and m.group(1) == "0" and d.is_dir():
            found += [(int(m.group(2)), int(p.group(1)), f) for f in d.iterdir() if (p := PASS_FILE.match(f.name))]
    return [f for *_, f in sorted(found)]


def _load(path: Path) -> dict:
    from pytest_miles.ckpt.torch_save import load_torch

    obj = load_torch(path, where=f"SGLang tensor dump {path}")  # restricted unpickler, lazy tensors
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise EngineError(f"SGLang tensor dump {path}: expected a dict of module name -> tensor, got "
                          f"{type(obj).__name__}")
    return obj


def _ids(raw: dict, path: Path) -> list[int]:
    from pytest_miles.ckpt.lazy import materialize

    if INPUT_IDS not in raw:
        raise EngineError(f"SGLang tensor dump {path}: no {INPUT_IDS} (not a forward-pass file of the dump)")
    return [int(x) for x in materialize(raw[INPUT_IDS]).reshape(-1).tolist()]


def _pair(value: Any, key: str) -> tuple[Any, Any]:
    """An RMSNorm's output: (normed, None) alone, (normed, hidden + residual) with the fused add."""
    if isinstance(value, list):
        if len(value) != 2:
            raise EngineError(f"SGLang tensor dump: {key} holds {len(value)} tensors (expected the normed "
                              "output and the residual sum)")
        return value[0], value[1]
    return value, None


def to_points(raw: dict, num_layers: int | None = None) -> dict[str, Any]:
    """One pass's module outputs (materialised) -> the locator's canonical names (module docstring)."""
    out: dict[str, Any] = {}
    if "model.embed_tokens" in raw:
        out["embedding"] = raw["model.embed_tokens"]
    layers: dict[int, dict[str, Any]] = {}
    for key, value in raw.items():
        if m := _LEAF.match(key):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for n, subs in sorted(layers.items()):
        if "input_layernorm" in subs:
            normed, before = _pair(subs["input_layernorm"], f"model.layers.{n}.input_layernorm")
            out[f"layers.{n}.input_norm"] = normed
            if before is not None and n > 0:
                out[f"layers.{n - 1}.output"] = before
        if "self_attn.o_proj" in subs:
            v = subs["self_attn.o_proj"]
            out[f"layers.{n}.attention"] = v[0] if isinstance(v, list) else v
        if "post_attention_layernorm" in subs:
            out[f"layers.{n}.post_attention_norm"] = _pair(subs["post_attention_layernorm"],
                                                           f"model.layers.{n}.post_attention_layernorm")[0]
        if "mlp.down_proj" in subs:
            v = subs["mlp.down_proj"]
            out[f"layers.{n}.mlp"] = v[0] if isinstance(v, list) else v
    if "model.norm" in raw:
        normed, last = _pair(raw["model.norm"], "model.norm")
        out["final_norm"] = normed
        top = num_layers - 1 if num_layers else max(layers, default=None)
        if last is not None and top is not None:
            out[f"layers.{top}.output"] = last
    return out


def _matching_run(files: list[Path], tokens: list[int]) -> list[tuple[Path, dict]] | None:
    """The consecutive passes of one stage whose input ids, joined, are `tokens` (the latest such)."""
    loaded = []
    for i, f in enumerate(files):
        try:
            loaded.append((f, _load(f)))
        except CheckpointError:
            if i < len(files) - 1:
                raise
            break  # the newest file may still be being written (torch.save is not atomic): read it next time
    ids = [_ids(raw, f) for f, raw in loaded]
    for start in range(len(loaded) - 1, -1, -1):
        got: list[int] = []
        for end in range(start, len(loaded)):
            got += ids[end]
            if got == tokens:
                return loaded[start:end + 1]
            if tokens[:len(got)] != got:
                break
    return None


def read_points(folder: str | Path, tokens: list[int], *, skip: set[Path] | frozenset = frozenset(),
                num_layers: int | None = None, wait: float = 10.0) -> dict[str, Any]:
    """The locator's records ([tokens, hidden] per canonical name) of the forward pass(es) of the
    dump in `folder` whose input ids are `tokens`, among the pass files not in `skip` (those that
    existed before the request). Waits up to `wait` s for the file; EngineError naming what it saw."""
    import torch

    from pytest_miles.ckpt.lazy import materialize

    tokens = [int(t) for t in tokens]
    deadline = time.monotonic() + wait
    while True:
        files = [f for f in pass_files(folder) if f not in skip]
        stages: dict[Path, list[Path]] = {}
        for f in files:
            stages.setdefault(f.parent, []).append(f)
        runs = [_matching_run(fs, tokens) for _, fs in sorted(stages.items(), key=lambda kv: _stage(kv[0]))]
        if runs and all(r is not None for r in runs):
            break
        if time.monotonic() > deadline:
            seen = {f.name: len(_ids(_load(f), f)) for f in files[-6:]}
            raise EngineError(f"SGLang tensor dump {folder}: no forward pass of the {len(tokens)} requested tokens "
                              f"(new pass files and their token counts: {seen or 'none'}); was the server started "
                              f"with {FOLDER_FLAG} {folder} and the radix cache off?")
        time.sleep(0.2)
    points: dict[str, Any] = {}
    for run in runs:
        parts = [to_points(materialize(raw), num_layers) for _, raw in run]
        for name in parts[0]:
            if all(name in p for p in parts):
                points[name] = torch.cat([p[name].reshape(-1, p[name].shape[-1]) for p in parts])
    for name, t in points.items():
        if t.shape[0] != len(tokens):
            raise EngineError(f"SGLang tensor dump {folder}: {name} has {t.shape[0]} rows for {len(tokens)} tokens")
    return points


def _stage(rank_dir: Path) -> int:
    return int(RANK_DIR.match(rank_dir.name).group(2))


def _folder(model_path: str | Path, dump_dir: str | Path | None, given: list[str]) -> tuple[Path, bool, int | None]:
    """(dump folder, owned by us, decoder layer count) of a dump engine; the dump's own settings
    given again by the caller are refused (the engine sets them: every layer, a folder it owns)."""
    from pytest_miles._files import load_json

    for name in given:
        if name.split("=")[0].replace("--sglang-", "--").replace("_", "-").lstrip("-") in (
                FOLDER_FLAG.lstrip("-"), LAYERS_FLAG.lstrip("-")):
            raise InputError(f"SGLang dump engine: {name.split('=')[0]} is set by the engine itself (every layer, "
                             "into a folder it owns); leave it out")
    config = Path(model_path) / "config.json"
    layers = load_json(config, "the model's config.json").get("num_hidden_layers") if config.exists() else None
    if dump_dir is not None:
        return Path(dump_dir), False, layers
    return Path(tempfile.mkdtemp(prefix="miles-sglang-dump-")), True, layers


class SGLangDumpEngine(SGLangEngine):
    """A real SGLang server with the debug tensor dump on, for the divergence locator:
    `hidden_states(tokens)` prefills the ids and reads that pass's layer outputs from the dump.
    CUDA graphs are off (SGLang turns them off with the dump) and so is the radix cache; start
    it apart from the production engine (`engine_factory("sglang", dump_hidden_states=True)`)."""

    name = "sglang-dump"

    def __init__(self, model_path: str | Path, *, dump_dir: str | Path | None = None,
                 extra_args: list[str] | tuple[str, ...] = (), **kw: Any) -> None:
        self.dump_dir, self._own_dump, self.num_layers = _folder(model_path, dump_dir, [str(a) for a in extra_args])
        super().__init__(model_path, extra_args=[*extra_args, *dump_args(self.dump_dir)], **kw)

    def warmup_params(self) -> list:
        """None: every forward pass writes a dump file, and SGLang itself skips its warm-up with the dump
        on; the locator's prefills are the only passes (greedy, no sampling kernel)."""
        return []

    def hidden_states(self, tokens: list[int]) -> dict:
        """Per layer point the [tokens, hidden] output of one prefill of `tokens` (module docstring)."""
        before = _before(self.dump_dir, tokens)
        self._post("/generate", {"input_ids": [int(t) for t in tokens], "sampling_params": dict(PROBE)})
        return _read_and_drop(self.dump_dir, tokens, before, self.num_layers, self._own_dump)

    def close(self) -> None:
        super().close()
        if self._own_dump:
            shutil.rmtree(self.dump_dir, ignore_errors=True)


class SGLangOfflineDumpEngine(SGLangOfflineEngine):
    """The in-process `sglang.Engine` with the debug tensor dump on (the same settings as
    SGLangDumpEngine, passed as ServerArgs fields): `hidden_states(tokens)` for the locator."""

    name = "sglang-offline-dump"

    def __init__(self, model_path: str | Path, *, dump_dir: str | Path | None = None, **engine_kwargs: Any) -> None:
        self.dump_dir, self._own_dump, self.num_layers = _folder(model_path, dump_dir, list(engine_kwargs))
        try:
            super().__init__(model_path, debug_tensor_dump_output_folder=str(self.dump_dir),
                             disable_radix_cache=True, **engine_kwargs)
        except BaseException:
            self._drop_dump()
            raise

    def hidden_states(self, tokens: list[int]) -> dict:
        before = _before(self.dump_dir, tokens)
        self._engine.generate(input_ids=[int(t) for t in tokens], sampling_params=dict(PROBE))
        return _read_and_drop(self.dump_dir, tokens, before, self.num_layers, self._own_dump)

    def _drop_dump(self) -> None:
        if self._own_dump:
            shutil.rmtree(self.dump_dir, ignore_errors=True)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._drop_dump()


def _before(folder: Path, tokens: list[int]) -> set[Path]:
    if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise InputError(f"hidden_states(tokens): {str(tokens)[:80]} is not accepted; expected a non-empty list of "
                         "token ids (non-negative integers)")
    return set(pass_files(folder))


def _read_and_drop(folder: Path, tokens: list[int], before: set[Path], num_layers: int | None, own: bool) -> dict:
    """read_points, then (in a folder the engine owns) the pass files seen so far are deleted: every
    decode step writes one, and a 24-layer model's prefill of 32 tokens is tens of MB."""
    points = read_points(folder, list(tokens), skip=before, num_layers=num_layers)
    if own:
        for f in pass_files(folder):
            f.unlink(missing_ok=True)
    return points
