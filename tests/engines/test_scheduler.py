"""The embedded dynamic-batching scheduler: concurrent requests share steps, a bounded pool retracts,
long prompts are chunked, the prefix cache is hit; batch-invariant mode gives every request the
bits it gets alone, and with invariance off the bits depend on what shared the steps."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.engines.base import SamplingParams  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.engines.scheduler import Scheduler  # noqa: E402


def _requests(n: int = 12):
    rng = random.Random(1)
    return [([rng.randrange(3, 500) for _ in range(rng.randint(1, 40))],
             SamplingParams(temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([-1, 20]), min_p=rng.choice([0, 0.05]),
                            max_new_tokens=rng.randint(2, 6), sampling_seed=i)) for i in range(n)]


def _serve(det: bool, reqs, **kw):
    sched = Scheduler(ReferenceEngine(deterministic=det), **kw)
    got = [sched.submit(p, sp, top_logprobs=4) for p, sp in reqs]
    for r in got:
        assert r.done.wait(60) and r.error is None
    return sched, [(r.output_ids, [x.hex() for x in r.logprobs], r.top) for r in got]


def test_concurrent_requests_are_batched_retracted_and_chunked_and_invariant_when_deterministic():
    reqs = _requests()
    sched, together = _serve(True, reqs, max_total_tokens=120, chunked_prefill_size=16)
    m = sched.metrics()
    assert m["retractions"] >= 1 and m["chunked_prefills"] >= 1 and m["max_running_batch"] >= 2, m
    alone = [_serve(True, [r])[1][0] for r in reqs]
    assert together == alone
    assert all(len(row) == 4 for out in together for row in out[2])


def test_with_invariance_off_the_bits_depend_on_the_batch():
    reqs = _requests()
    _, together = _serve(False, reqs, max_total_tokens=120, chunked_prefill_size=16)
    alone = [_serve(False, [r])[1][0] for r in reqs]
    assert sum(a != b for a, b in zip(together, alone)) >= len(reqs) // 2


def test_prefix_cache_hit_is_counted_and_flush_refused_while_busy():
    sched = Scheduler(ReferenceEngine(deterministic=True), prefix_cache=True)
    first = sched.submit(list(range(3, 30)), SamplingParams(max_new_tokens=3))
    assert first.done.wait(30)
    second = sched.submit(list(range(3, 30)) + first.output_ids + [7], SamplingParams(max_new_tokens=2))
    assert second.done.wait(30)
    assert second.cached_tokens >= 27 and sched.metrics()["cached_tokens"] == second.cached_tokens
    assert sched.flush() and sched.metrics()["cache_entries"] == 0


def test_bad_settings_and_impossible_requests_are_refused():
    with pytest.raises(ValueError, match="max_total_tokens"):
        Scheduler(ReferenceEngine(), max_total_tokens=0)
    sched = Scheduler(ReferenceEngine(), max_total_tokens=10)
    with pytest.raises(ValueError, match="never be scheduled"):
        sched.submit(list(range(3, 12)), SamplingParams(max_new_tokens=4))


def test_a_request_the_sampler_cannot_serve_fails_alone():
    """The loop thread outlives a request whose sampling raises: that request ends with its error, the others in
    the same steps are served as they would be alone, and later requests are served (before: the thread died and
    every later request waited forever)."""
    reqs = _requests(4)
    _, alone = _serve(True, reqs)
    sched = Scheduler(ReferenceEngine(deterministic=True))
    broken = SamplingParams(temperature=1.0, max_new_tokens=3)
    object.__setattr__(broken, "temperature", "hot")  # past the validation: the sampler itself raises
    got = [sched.submit(p, sp, top_logprobs=4) for p, sp in reqs[:2]] + [sched.submit([5, 6, 7], broken)]
    got += [sched.submit(p, sp, top_logprobs=4) for p, sp in reqs[2:]]
    assert all(r.done.wait(60) for r in got)
    assert got[2].error and got[2].error.startswith("TypeError"), got[2].error
    served = [r for i, r in enumerate(got) if i != 2]
    assert [(r.output_ids, [x.hex() for x in r.logprobs], r.top) for r in served] == alone
    later = sched.submit(*reqs[0], top_logprobs=4)
    assert later.done.wait(60) and later.error is None and sched.state()["alive"]


def test_a_temperature_below_sglangs_epsilon_is_greedy():
    """SGLang 0.5.17 samples a temperature below 1e-6 greedily (sampling_params.py:144); dividing by 1e-320 would
    make the probabilities NaN."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    tiny = SamplingParams(temperature=1e-320, max_new_tokens=4, sampling_seed=3)
    _, (a, b) = _serve(True, [([5, 6, 7], greedy), ([5, 6, 7], tiny)])
    assert a == b
