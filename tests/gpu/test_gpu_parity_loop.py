"""The RL loop's train_rollout_logprob_abs_diff explained on the GPU: the same loop as
tests/gpu/test_gpu_loop.py and the suite (SGLang deterministic with the engine factory's settings,
megatron-core's local spec in fp32, the default tiny shape, seed 1234, 3 iterations; its
configuration taken from `LoopFactory.setup`, which the loop itself runs with). It recorded
0.0206 on an H200 (iteration 3's figure) with the trainer's fp32 master weights scoring and SGLang
serving their bf16 export.

- by iteration: the parity report of the loop's own records (the rollout's logprobs and the
  trainer's before its step): first generated token vs the rest, by confidence and position.
- decomposed: the loop again up to iteration 2 (bitwise equal to the first run's, checked), its
  checkpoint loaded: the trainer as it was when iteration 3 scored. Iteration 3's rollout replayed
  on the engine (the same tokens, checked) and scored (a) by those fp32 master weights, the loop's
  figure, and (b) by the trainer reset to the bf16 copy SGLang serves: the kernels' and compute
  precision's share; (a) - (b) is the share of the weights' bf16 rounding.
- located: the tensor-dump engine on iteration 3's weights, the layer profile of the worst
  sequence against (a) and (b): where each gap starts and how it grows.
Two SGLang starts (the loop's engine, then the dump engine) and one trainer session besides the loops';
wall time 3-7 min (engine starts 50-190 s each, the two loops ~20-30 s each, the rest seconds).

Run on the H200: `python -m pytest tests/gpu/test_gpu_parity_loop.py -v -s -rs -p no:randomly
--miles-require-gpu --miles-report /tmp/parity-loop/report.json` (reports under /tmp/parity-loop/parity-loop/).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
ITERATIONS = 3  # as the loop test and the suite: 0.0206 is the last iteration's figure
SEED = 1234
_FIGURES: dict = {}  # what the tests measured, for the summary the last one prints


def _out(request, tmp_path) -> Path:
    report = request.config.getoption("--miles-report", default=None)
    out = Path(report).parent / "parity-loop" if report else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def setup(rl_loop_factory):
    return rl_loop_factory.setup("sglang", seed=SEED)


@pytest.fixture(scope="module")
def loop(rl_loop_factory, setup):
    run = rl_loop_factory("sglang", iterations=ITERATIONS, seed=SEED, name="loop")
    for r in run.records:
        print(f"\niteration {r.iteration}: train_rollout_logprob_abs_diff {r.train_rollout_logprob_abs_diff!r}")
    return run


@pytest.fixture(scope="module")
def key(engine_factory, setup, loop):
    backend = engine_factory("sglang", **setup.engine).server_info().get("attention_backend")
    return {"model": "tiny", "rollout": "bf16", "train": "fp32", "backend": str(backend), "tp": 1}


@pytest.fixture(scope="module")
def before_last(rl_loop_factory, loop):
    """The loop to iteration ITERATIONS - 1: its checkpoint is the trainer when the last iteration
    scored, its last pushed weights what the engine served then."""
    from pytest_miles import assert_loops_bitwise_equal

    run = rl_loop_factory("sglang", iterations=ITERATIONS - 1, seed=SEED, name="before-last")
    assert_loops_bitwise_equal(loop.records[: ITERATIONS - 1], run.records)
    return run


@pytest.fixture(scope="module")
def master(rl_loop_factory, setup, before_last, tmp_path_factory):
    """A trainer session on the loop's checkpoint after iteration ITERATIONS - 1 (fp32 master
    weights), and those weights as an fp32 HF export (to reset back to them)."""
    trainer = rl_loop_factory.make_trainer(**setup.trainer)
    with trainer.session(load_dir=Path(before_last.work_dir) / "checkpoints", hf_config=setup.hf_config) as s:
        yield s, s.export_hf(tmp_path_factory.mktemp("master") / "fp32", "float32")


def _iteration_report(records, key):
    from pytest_miles.checks.parity import loop_parity

    return loop_parity(records, key)


def test_loop_parity_by_iteration(loop, key, miles_record, request, tmp_path):
    out = _out(request, tmp_path)
    for r in loop.records:
        report = _iteration_report([r], key)
        (out / f"loop-iteration-{r.iteration}.json").write_text(json.dumps(report.to_json()))
        f = report.pairs["train_vs_decode"]
        print(f"\niteration {r.iteration}:\n{report.render()}")
        assert not report.identity, report.render()
        # the report's mean is the loop's own figure (same tokens, same logprobs)
        assert f.mean_abs == pytest.approx(r.train_rollout_logprob_abs_diff, rel=1e-9, abs=1e-12), report.render()
        _FIGURES[f"iteration {r.iteration}"] = (f.mean_abs, f.first_token_mean_abs, f.rest_mean_abs, f.max_abs)
        miles_record(f"RL loop parity, iteration {r.iteration} (SGLang bf16 vs megatron-core fp32, tiny)",
                     mean_abs=f.mean_abs, first_token=f.first_token_mean_abs, rest=f.rest_mean_abs, max_abs=f.max_abs,
                     k3_kl=f.k3_kl, bitwise_equal=f"{f.bitwise_equal}/{f.tokens}")


def _replay(engine, last):
    """Iteration `last`'s rollout as the loop sent it: (batch, params); the engine's answer checked
    against the loop's recorded tokens (same weights, same batch, deterministic)."""
    from pytest_miles.scenarios.loop.run import rollout_batch

    batch, params = rollout_batch(last.prompts, last.sampling_seeds, len(last.tokens[0][0]))
    engine.flush_cache()  # as after the loop's weight sync: no cached prefix
    got = [o.output_ids for o in engine.generate(batch, params)]
    want = [list(t) for row in last.tokens for t in row]
    assert got == want, (f"iteration {last.iteration} replayed on the loop's engine sampled other tokens than the loop "
                         f"(first differing sample {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)})")
    return batch, params


def test_loop_gap_decomposed(engine_factory, setup, loop, before_last, master, key, miles_record, request, tmp_path):
    from pytest_miles.scenarios.parity import measure_parity

    session, master_hf = master
    out = _out(request, tmp_path)
    engine = engine_factory("sglang", **setup.engine)  # the loops' engine, still live
    served = Path(before_last.records[-1].weights)
    engine.update_weights_from_disk(served)
    last = loop.records[-1]
    batch, params = _replay(engine, last)
    reports = {}
    for name, reset in (("fp32 master weights (the loop)", None), ("the bf16 copy SGLang serves", served),
                        ("fp32 master again, through its HF export", master_hf)):
        if reset is not None:
            session.reset(reset)
        engine.flush_cache()
        rep = measure_parity(engine, session, batch, params=params, config={**key, "weights": name},
                             plot=out / f"iteration-{last.iteration}-{len(reports)}.png")
        (out / f"iteration-{last.iteration}-{len(reports)}.json").write_text(json.dumps(rep.to_json()))
        print(f"\ntrainer on {name}:\n{rep.render()}")
        assert not rep.identity, rep.render()
        reports[name] = rep.pairs["train_vs_decode"]
    (a, b, again) = reports.values()
    _FIGURES["master"], _FIGURES["same"] = (a.mean_abs, a.first_token_mean_abs, a.rest_mean_abs, a.max_abs), (
        b.mean_abs, b.first_token_mean_abs, b.rest_mean_abs, b.max_abs)
    miles_record(f"RL loop iteration {last.iteration}'s gap decomposed", loop=last.train_rollout_logprob_abs_diff,
                 reproduced=a.mean_abs, same_bf16_values=b.mean_abs, weight_rounding=a.mean_abs - b.mean_abs,
                 first_token=a.first_token_mean_abs, rest=a.rest_mean_abs)
    assert again.deltas == a.deltas, "the fp32 HF export does not reload the master weights exactly"
    assert a.mean_abs == pytest.approx(last.train_rollout_logprob_abs_diff, rel=0.05), (
        f"the loop's figure {last.train_rollout_logprob_abs_diff:.6g} not reproduced by scoring its samples on its "
        f"checkpoint: {a.mean_abs:.6g}")


def test_locate_loop_gap(engine_factory, loop, before_last, master, key, miles_record, request, tmp_path):
    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    out = _out(request, tmp_path) / "locator"
    last = loop.records[-1]
    report = _iteration_report([last], key)
    deltas = report.pairs["train_vs_decode"].deltas
    worst = max(range(len(deltas)), key=lambda i: max(map(abs, deltas[i]), default=0.0))
    n = len(last.sampling_seeds[0])
    tokens = list(last.prompts[worst // n]) + list(last.tokens[worst // n][worst % n])
    served = Path(before_last.records[-1].weights)
    engine = engine_factory("sglang", model=str(served), deterministic=True, dump_hidden_states=True)
    session, master_hf = master
    answers = {}
    for name, weights in (("master", master_hf), ("same", served)):
        session.reset(weights)
        prof = locate_engine_vs_trainer(engine, session, tokens, out / name, tolerance=0.0)
        (out / name / "layers.json").write_text(json.dumps(prof.to_json()))
        print(f"\nsequence {worst} ({len(tokens)} ids), trainer on {name} weights:\n{prof.render()}")
        answers[name] = prof.answer()
    miles_record(f"RL loop iteration {last.iteration}: where the gap starts", fp32_master=answers["master"],
                 same_bf16_values=answers["same"], profiles=str(out))
    print("\nwhere the loop's figure comes from (mean |delta|, first token, rest, max):")
    for k, v in _FIGURES.items():
        print(f"  {k:<10} " + "  ".join(f"{x:.5g}" for x in v))
    print(f"  located: fp32 master: {answers['master']}\n           same bf16 values: {answers['same']}")
