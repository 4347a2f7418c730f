"""Train-rollout parity and the divergence locator on the GPU, one test per (cell, phase) of
`scenarios.parity_cells.schedule(CELLS)`: a cell is a model shape x rollout precision x train
precision (tiny128 and qwen2.5-0.5b served in bf16 against megatron-core's local spec in fp32 and
TransformerEngine in bf16; tiny128 served as a block-wise FP8 checkpoint against TE bf16 and TE FP8
block-wise). Test ids: `test_parity_cell[<shape>-<rollout>-x-<train>-<phase>]`.

- parity: SGLang (deterministic, production settings: CUDA graphs on) samples seeded prompts and
  recomputes them by prefill; the trainer scores the same ids on the same weights (the bf16 files
  the FP8 checkpoint was quantized from). Prints the parity report (identity first, then mean/max
  |delta|, first token vs rest, confidence buckets, K3-KL, bitwise equal, by position) and writes one
  report JSON per run in <dir of --miles-report>/parity/<cell>/ (or the test's tmp dir) for
  `pytest-miles parity-budget`; a cell without a checked-in budget ends as a skip, "unbudgeted".
- locate: a second SGLang server with its debug tensor dump on (CUDA graphs and radix cache off)
  prefills one 32-token sequence; its per-layer outputs are compared with the trainer's forward
  hooks on the same ids: the layer profile is printed, recorded and written (layers.json/png).
- planted (tiny128 x fp32 only): a fault planted in the trainer's layer 1 MLP is named at layer 1 mlp.
The order starts each engine configuration's two SGLang servers once (the engine factory keeps one
live); trainer sessions stay up for the module, one per shape x train precision. TE cells skip,
naming why, where transformer_engine is not importable (run te-stash/te-install first).

Wall time per engine configuration (two SGLang starts, 50-190 s each warm to cold, a cold FP8 one
~4 min; a trainer session 10-60 s; 5 parity runs and a profile seconds): tiny128-bf16 3-7 min (the
local-spec half took 133 s on 2026-12-04), qwen2.5-0.5b 5-9 min, tiny128-fp8_blockwise 4-8 min.
Run on the H200, one engine configuration per command (scripts/gpu-steps/parity-next.steps):
`python -m pytest tests/gpu/test_gpu_parity.py -k tiny128-bf16 -v -s -rs -p no:randomly
--miles-require-gpu --miles-report /tmp/parity/report.json`
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import pytest

from pytest_miles.scenarios.parity_cells import CELLS, schedule, serve_weights

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]  # each test well under 10 minutes (an engine start in it)
RUNS = 5  # one report per sampling seed: what a budget is calibrated from
TE = importlib.util.find_spec("transformer_engine") is not None
PLAN = schedule(CELLS)


def _out_dir(request, tmp_path) -> Path:
    report = request.config.getoption("--miles-report", default=None)
    return Path(report).parent / "parity" if report else tmp_path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("parity-cells")


@pytest.fixture(scope="module")
def sessions(rl_loop_factory, work):
    """cell -> a live trainer session on the cell's bf16 weights (one per shape x train precision,
    opened on first use, all closed at the end of the module)."""
    live: dict = {}
    with ExitStack() as stack:
        def get(cell):
            key = (cell.shape, cell.train)
            if key not in live:
                if cell.needs_te and not TE:
                    pytest.skip(f"not applicable here: {cell.id} trains with TransformerEngine, which is not "
                                "importable (scripts/gpu-host.sh te-stash 1..5, te-install; . /tmp/miles-te/env.sh)")
                bf16, _ = serve_weights(cell, work)
                trainer = rl_loop_factory.make_trainer(seed=1, **cell.trainer_kwargs())
                live[key] = stack.enter_context(trainer.session(init_hf=bf16, hf_config=asdict(cell.config)))
            return live[key]

        yield get


def _tokens(cell) -> list[int]:
    """One seeded sequence of 32 ids (a multiple of 16, what TE's FP8 GEMMs need)."""
    from pytest_miles.scenarios.loop.run import LoopConfig, prompts_for

    return list(prompts_for(LoopConfig(seed=7, vocab_size=cell.config.vocab_size, prompt_len=(32, 32)), 1)[0])


def _dump_engine(engine_factory, serve):
    engine = engine_factory("sglang", model=str(serve), deterministic=True, dump_hidden_states=True)
    assert engine.name == "sglang-dump" and hasattr(engine, "hidden_states"), engine
    return engine


def _parity(cell, session, serve, engine_factory, miles_record, out):
    from pytest_miles import assert_parity
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.errors import Unbudgeted
    from pytest_miles.scenarios.loop.run import LoopConfig, prompts_for
    from pytest_miles.scenarios.parity import measure_parity

    engine = engine_factory("sglang", model=str(serve), deterministic=True)
    key = cell.budget_key(engine.server_info().get("attention_backend"))
    reports = []
    for run in range(RUNS):
        prompts = prompts_for(LoopConfig(seed=100 + run, vocab_size=cell.config.vocab_size, prompt_len=(8, 24)), 1)
        params = SamplingParams(temperature=1.0, max_new_tokens=32, sampling_seed=run, ignore_eos=True)
        report = measure_parity(engine, session, prompts, params=params, config=key, plot=out / f"parity-{run}.png",
                                pad_multiple=cell.pad_multiple)
        (out / f"parity-{run}.json").write_text(json.dumps(report.to_json()))
        print(f"\n{cell.id} run {run}:\n{report.render()}")
        assert not report.identity, report.render()
        reports.append(report)
    figs = [r.pairs["train_vs_decode"] for r in reports]
    f = figs[0]
    miles_record(f"train-rollout parity, SGLang vs megatron-core, {cell.id}", mean_abs=f.mean_abs, max_abs=f.max_abs,
                 first_token=f.first_token_mean_abs, rest=f.rest_mean_abs, k3_kl=f.k3_kl,
                 bitwise_equal=f"{f.bitwise_equal}/{f.tokens}",
                 runs_mean_abs=" ".join(f"{x.mean_abs:.4g}" for x in figs),
                 runs_first_token=" ".join(f"{x.first_token_mean_abs:.4g}" for x in figs), reports=str(out))
    print(f"\nbudget from these runs: pytest-miles parity-budget {out}/parity-*.json --host '1 x H200'")
    try:
        assert_parity(reports[0])
    except Unbudgeted as exc:
        pytest.skip(str(exc))


def _locate(cell, session, serve, engine_factory, miles_record, out):
    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    engine = _dump_engine(engine_factory, serve)
    prof = locate_engine_vs_trainer(engine, session, _tokens(cell), out, tolerance=0.0)
    print(f"\n{cell.id}:\n{prof.render()}")
    (out / "layers.json").write_text(json.dumps(prof.to_json()))
    names = {r["name"] for r in prof.rows}
    wanted = {"embedding", "final_norm"} | {f"layers.{n}.{s}" for n in range(cell.config.num_hidden_layers)
                                            for s in ("attention", "mlp", "output")}
    assert wanted <= names, f"points not compared: {sorted(wanted - names)}\n{prof.render()}"
    # the embedding rows are the same bf16 weights (FP8 leaves embed_tokens unquantized) looked up by the same ids
    assert prof.rows[0]["name"] == "embedding" and prof.rows[0]["max_abs"] == 0.0, prof.render()
    miles_record(f"divergence locator, SGLang vs megatron-core, {cell.id}", answer=prof.answer(),
                 points=len(prof.rows), profile=str(out / "layers.json"))


def _planted(cell, session, serve, engine_factory, tmp_path):
    """Negative control: layer 1's MLP down projection scaled in the trainer's weights, by a factor
    that makes its change 20 times the largest clean SGLang-vs-trainer gap; with the tolerance at
    twice that gap, the locator names layer 1 mlp (every point before it is as in the clean run)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    engine = _dump_engine(engine_factory, serve)
    tokens = _tokens(cell)
    clean = locate_engine_vs_trainer(engine, session, tokens, tmp_path / "clean", plot=False)
    gap = max(r["max_abs"] for r in clean.rows)
    mlp = float(engine.hidden_states(tokens)["layers.1.mlp"].float().abs().max())
    factor = max(2.0, 1.0 + 20.0 * max(gap, 1e-3) / max(mlp, 1e-6))
    planted = tmp_path / "planted"
    shutil.copytree(serve, planted)
    f = next(planted.glob("*.safetensors"))
    state = load_file(f)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = (state[name].float() * factor).to(state[name].dtype)
    save_file(state, str(f))
    try:
        session.reset(planted)
        prof = locate_engine_vs_trainer(engine, session, tokens, tmp_path / "p", tolerance=2.0 * gap)
    finally:
        session.reset(serve)
    print(f"\nplanted x{factor:.3g} (clean gap {gap:.3g}, layer 1 mlp max {mlp:.3g}):\n{prof.render()}")
    assert prof.first is not None and prof.first["name"] == "layers.1.mlp", prof.render()


@pytest.mark.parametrize(("cell", "phase"), PLAN, ids=[f"{c.id}-{p}" for c, p in PLAN])
def test_parity_cell(cell, phase, engine_factory, sessions, work, miles_record, request, tmp_path):
    session = sessions(cell)  # a TE cell skips here, before any engine starts
    bf16, serve = serve_weights(cell, work)
    if phase == "planted":
        assert serve == bf16, f"{cell.id}: the planted fault is shown on a bf16-served cell"
        _planted(cell, session, serve, engine_factory, tmp_path)
        return
    out = _out_dir(request, tmp_path) / cell.id / ("locator" if phase == "locate" else "")
    out.mkdir(parents=True, exist_ok=True)
    (_parity if phase == "parity" else _locate)(cell, session, serve, engine_factory, miles_record, out)
