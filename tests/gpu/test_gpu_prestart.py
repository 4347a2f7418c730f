"""Real SGLang on the GPU host: the suite's engines started together in the background on one GPU
(KV pools fixed in tokens in advance, so they start at once, each given exactly its pool; servers whose
pool cannot be planned staggered on SGLang's memory-pool line), and the deterministic engine lent
to another model's weights and given its own back bit for bit (what the suite's RL loop does)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pytest_miles.engines.base import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6]]


def _gpu_memory() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def test_the_suites_engines_start_together_on_one_gpu(engine_factory, miles_settings):
    from pytest_miles.suite.conftest import engine_calls

    # the bundled suite's four SGLang configurations, as it asks for them
    calls = list(engine_calls(lambda name: "sglang" if name == "engine" else miles_settings(name)).values())
    print(f"\nbefore: {_gpu_memory()}")
    labels = engine_factory.prestart(calls)
    assert len(labels) == len(calls), labels
    engines = [engine_factory(**call) for call in calls]
    for label, eng in zip(labels, engines):
        print(f"{label}: spawned {eng.spawned_at:.1f}, memory pool {eng.settled_at}, up {eng.ready_at:.1f} "
              f"({eng.startup_seconds:.1f} s)")
    import re

    from pytest_miles.engines.prestart import small_pool

    spec_of = {id(e): engine_factory.specs[k] for k, e in engine_factory.live.items()}
    planned = {id(e): spec_of[id(e)].options.get("max_total_tokens") for e in engines}
    beside = [e for e in engines if small_pool(spec_of[id(e)]) or planned[id(e)]]
    chain = [e for e in engines if e not in beside]
    print(f"beside: {len(beside)}, in the chain: {len(chain)}")
    for before, after in zip(chain, chain[1:]):  # each start began once the one before held its memory
        assert before.settled_at is not None, "SGLang's memory-pool line not found in its log: the starts were serial"
        assert after.spawned_at >= before.settled_at
    first_settled = min(e.settled_at for e in engines if e.settled_at is not None)
    for eng in beside:  # a pool fixed in advance: started at once, beside the others, and given exactly its cap
        assert eng.spawned_at < first_settled
        if planned[id(eng)]:
            pools = re.findall(r"max_total_num_tokens=(\d+)", open(eng.log_path).read())
            assert pools and int(pools[-1]) == planned[id(eng)], (pools, planned[id(eng)])
    print(f"all up: {_gpu_memory()}")
    assert engine_factory.launches == len(calls)
    for eng in engines:
        assert all(o.output_ids for o in eng.generate(PROMPTS, GREEDY))


def test_a_lent_engine_gets_its_own_weights_back_bit_for_bit(engine_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    eng = engine_factory("sglang")
    own = engine_factory.specs[next(k for k, e in engine_factory.live.items() if e is eng)].model_dir
    other = tmp_path / "other"
    shutil.copytree(own, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v * 1.5 if v.dim() == 2 else v for k, v in weights.items()}, str(other / "model.safetensors"))
    before = eng.generate(PROMPTS, GREEDY)
    with engine_factory.lend("sglang", model=str(other)) as lent:
        assert lent is eng
        during = lent.generate(PROMPTS, GREEDY)
    after = eng.generate(PROMPTS, GREEDY)
    assert [o.logprobs for o in during] != [o.logprobs for o in before], "the other weights were not served"
    assert [(o.output_ids, o.logprobs) for o in after] == [(o.output_ids, o.logprobs) for o in before]
