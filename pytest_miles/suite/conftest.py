"""Shared pieces of the bundled suite."""

from __future__ import annotations

import importlib.util
import os

import pytest

from pytest_miles import engine_start_limit, miles_setting
from pytest_miles.errors import MilesError, Unavailable


def installed(module: str) -> bool:
    """Whether `module` can be imported (a dotted name whose parent package is missing: False, where
    importlib.util.find_spec raises ModuleNotFoundError)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str) -> None:
    """A part of the suite needs `module`: Unavailable (skip; fail under --miles-require-gpu) without it."""
    if not installed(module):
        raise Unavailable(f"{module} is not installed (pip install 'pytest-miles[{extra}]')")


@pytest.fixture(autouse=True)
def _announce(request, capsys):
    """The suite says where it is, even without -v, while engines and trainers start."""
    with capsys.disabled():
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None and request.config.get_verbosity() > 0:
            tr.write(f"\n[miles] {request.node.nodeid} ... ")
    yield


# Scheduler pressure for the traffic check: a small KV pool, chunked prefill, many clients.
TRAFFIC = {"requests": 48, "max_prompt": 100, "max_new_tokens": 8, "pool": 240, "chunk": 32}
# SGLang: a 2,048-token pool, 64-token chunks. Its deterministic scheduler cuts chunks only at its prefill
# alignment (4,096 tokens by default; a smaller chunk starves every longer prompt, sgl-project/sglang#36344:
# the stall of 2026-12-04 on an H200), so the deterministic engine runs with the alignment lowered to the chunk
# (engines/sglang_chunking.py): chunked prefill then happens on the tiny model, cut where SGLang cuts.
# --schedule-conservativeness 0.05: admission counts on short answers, so decode outgrows the pool and
# SGLang retracts (at its default it admits only with room for 0.7 x max_new_tokens; no retraction was seen
# with 4,096/128 and 256 requests on an H200).
SGLANG_TRAFFIC = {"pool": 2048, "chunk": 64, "conservativeness": 0.05}
# The cache/API server's KV pool: its checks send a few prompts of at most ~100 tokens, so 65,536 tokens
# never evict what they read back. Capped small, the server starts at once beside the staggered chain of
# the others (engines/prestart.py; 32 MiB on the tiny shape, 768 MiB on qwen2.5-0.5b). In the chain it was
# the last of five starts, ~50 s apart even with warm kernel caches (H200, 2026-12-04).
SGLANG_CACHE_API_POOL = 65536


def engine_calls(setting, tokenized_model: str | None = None) -> dict[str, dict]:
    """The engine configurations the suite's tests ask for, by name, as engine_factory arguments:
    one place, so that what the session starts in the background is exactly what the tests ask for.
    `tokenized_model` (the suite's model folder with the embedded tokenizer, `tokenized_model()`) adds
    "cache-api": deterministic, a prefix cache, /metrics and a tokenizer (the OpenAI surfaces need one)."""
    kind = setting("engine")
    calls = {"control": {"kind": kind, "deterministic": False}, "deterministic": {"kind": kind, "deterministic": True}}
    if tokenized_model is not None:
        calls["cache-api"] = ({"kind": "sglang", "model": tokenized_model, "deterministic": True,
                               "extra_args": ("--enable-metrics", "--max-total-tokens", str(SGLANG_CACHE_API_POOL))}
                              if kind.startswith("sglang") else
                              {"kind": "reference-server", "model": tokenized_model, "deterministic": True,
                               "threads": 1, "prefix_cache": True})
    for name, deterministic in (("traffic", True), ("traffic-control", False)):
        if kind.startswith("sglang"):
            from pytest_miles import aligned_env

            args = ("--max-total-tokens", str(SGLANG_TRAFFIC["pool"]),
                    "--chunked-prefill-size", str(SGLANG_TRAFFIC["chunk"]), "--enable-metrics",
                    "--schedule-conservativeness", str(SGLANG_TRAFFIC["conservativeness"]))
            env = aligned_env(setting("attention_backend"), SGLANG_TRAFFIC["chunk"]) if deterministic else {}
            calls[name] = {"kind": "sglang", "deterministic": deterministic, "extra_args": args,
                           **({"env": env} if env else {})}
        else:
            calls[name] = {"kind": "reference-server", "deterministic": deterministic, "threads": 1,
                           "prefix_cache": True, "max_total_tokens": TRAFFIC["pool"],
                           "chunked_prefill_size": TRAFFIC["chunk"]}
    return calls


def engine_for(name: str, engine_factory, miles_settings, tokenized_model: str | None = None, **kw):
    """The engine of one named configuration (engine_calls) from the engine factory."""
    return engine_factory(**engine_calls(miles_settings, tokenized_model)[name], **kw)


TOKENIZED = pytest.StashKey[str]()


def tokenized_model(request, engine_factory) -> str:
    """The suite's model folder with the embedded tokenizer beside it (its files linked), made once per
    session in the session's temporary directory: the same path for the background start and the test."""
    from pytest_miles import with_tokenizer

    stash = request.config.stash
    if TOKENIZED not in stash:
        dest = request.getfixturevalue("tmp_path_factory").mktemp("model-with-tokenizer")
        stash[TOKENIZED] = str(with_tokenizer(engine_factory.model_path(), dest))
    return stash[TOKENIZED]


# The tests that ask for engines, in the order the suite runs them, with the configurations they ask
# for. The tests that need no engine run first: with --miles-engine-prestart (the default) every engine
# below starts in the background at session start and its minutes of kernel compilation overlap them.
# The engine factory keeps one live configuration otherwise, so grouping the tests that share one
# starts each once. The negative controls come before their positive checks: their verdict decides
# whether a pass of the positive check counts (a control that cannot fail makes the positive vacuous).
# The RL loop borrows the deterministic engine (its weights loaded, then put back: EngineFactory.lend).
ENGINES_OF = (
    ("test_rollout.py::test_negative_control", ("control",)),
    ("test_rollout.py::test_batch_invariance", ("deterministic",)),
    ("test_snapshots.py::test_rollout", ("deterministic",)),
    ("test_cost.py::test_rollout_cost", ("deterministic", "control")),
    ("test_loop.py::", ("deterministic",)),
    ("test_rollout.py::test_deterministic_under_load", ("traffic",)),
    ("test_rollout.py::test_traffic_negative_control", ("traffic-control",)),
    ("test_rollout.py::test_every_", ("cache-api",)),  # cache paths, API surfaces: the model with a tokenizer
)
# The megatron-core rank processes the suite's tests ask for, started in the background at session start
# beside the engines (trainers/pool.py), so that their start-up (python, torch and megatron-core imports,
# the process group; ~20 s each on an H200 host) overlaps other tests: "runs" is the pool group the training
# runs go to, "second-runs" the group of test_run_twice's second run (its own processes: SECOND_RUN), and
# each "session" one spare for the trainer session of one RL loop run (two runs, two spares).
TRAINERS_OF = (
    ("test_snapshots.py::test_training", ("runs",)),
    ("test_training.py::test_run_twice", ("runs", "second-runs")),
    ("test_training.py::", ("runs",)),
    ("test_cost.py::test_training_cost", ("runs",)),
    ("test_loop.py::", ("session", "session")),
)
# The second run of test_run_twice_bitwise_equal: other rank processes than the first's (a pool group of their
# own: the pool keys its groups by the rank environment).
SECOND_RUN = {"PYTEST_MILES_RUN": "second"}
FIRST = ("test_doctor.py",)
# Timing measurements need no engine but a quiet machine: they run after the engine tests, when no
# engine is starting (compiling kernels, capturing CUDA graphs) beside them.
QUIET = ("test_cost.py::test_training_cost",)
ENGINE_FIXTURES = {"engine_factory": 2, "engine": 1, "sglang_engine": 1, "reference_engine": 1}  # starts a test may pay


def _name(item) -> str:
    return f"{item.path.name}::{item.name}"


def rank(item) -> tuple[int, int]:
    """The doctor, then the suite's tests that need no engine, then ENGINES_OF's order, then other
    tests that use engines, then the timing measurements (QUIET), then tests from outside the suite."""
    if not _is_suite(item):
        return (3, 0)
    name = _name(item)
    if name.startswith(QUIET):
        return (2, len(ENGINES_OF) + 1)
    if not ENGINE_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
        return (0, 0 if name.startswith(FIRST) else 1)
    return (2, next((i for i, (p, _) in enumerate(ENGINES_OF) if name.startswith(p)), len(ENGINES_OF)))


def prestart_names(config, items) -> list[str]:
    """The configurations the selected suite tests will ask for, in the order they will (none with
    --miles-engine-prestart=off, and none in a pytest-xdist worker: it learns its tests one at a time,
    so it would start every engine, once per worker)."""
    if miles_setting(config, "engine_prestart") != "on" or hasattr(config, "workerinput"):  # an xdist worker
        return []
    names: list[str] = []
    for item in items:
        if _is_suite(item):
            uses = next((n for p, n in ENGINES_OF if _name(item).startswith(p)), ())
            names += [n for n in uses if n not in names]
    return names


def trainer_prestarts(config, items) -> list[str]:
    """The rank processes (TRAINERS_OF) the selected suite tests will ask for, in the order they will:
    each pool group once, a session spare per loop run (none where engines do not start in the
    background either: prestart_names; none with --miles-placement=ray: ranks are Ray actors there)."""
    if miles_setting(config, "engine_prestart") != "on" or hasattr(config, "workerinput") \
            or miles_setting(config, "placement") == "ray":
        return []
    names: list[str] = []
    for item in items:
        if _is_suite(item):
            uses = next((n for p, n in TRAINERS_OF if _name(item).startswith(p)), ())
            names += [n for n in uses if n == "session" or n not in names]
    return names


@pytest.fixture(scope="session", autouse=True)
def _prestart(request):
    """At session start: the engines and the megatron-core ranks the selected tests need start in the
    background (docs/suite.md)."""
    names = prestart_names(request.config, request.session.items)
    if names:
        try:
            factory = request.getfixturevalue("engine_factory")
        except MilesError:  # no torch: the tests that need engines say so themselves
            factory = None
        if factory is not None:
            model = tokenized_model(request, factory) if "cache-api" in names else None
            calls = engine_calls(lambda n: miles_setting(request.config, n), model)
            factory.prestart([calls[n] for n in names])
    prestart_trainers(request, trainer_prestarts(request.config, request.session.items))


def prestart_trainers(request, names: list[str]) -> None:
    """The pool groups and session spares of `names` (TRAINERS_OF), made by the trainers the tests will
    make (nothing without megatron-core, with --miles-trainer-reuse=off, or where the pool refuses them)."""
    if not names or not installed("megatron.core"):
        return
    try:
        pool = request.getfixturevalue("miles_trainer_pool")
        if pool is None:
            return
        loops = request.getfixturevalue("rl_loop_factory")  # its trainer maker is the tests' one
        tp = miles_setting(request.config, "tensor_parallel")
        for name in dict.fromkeys(n for n in names if n != "session"):
            pool.prestart(loops.make_trainer(tensor_parallel=tp, **({"env": SECOND_RUN} if name == "second-runs"
                                                                    else {})))
        if "session" in names:
            setup = loops.setup(miles_setting(request.config, "engine"))
            pool.prestart_sessions(loops.make_trainer(**setup.trainer), names.count("session"))
    except (MilesError, pytest.skip.Exception):  # the tests that make these trainers say why they cannot
        return


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, which would interleave configurations
def pytest_collection_modifyitems(config, items):
    items.sort(key=rank)
    if miles_setting(config, "suite_profile") == "commit":
        keep = [i for i in items if not _is_suite(i) or i.name in COMMIT_PROFILE]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    scale_timeouts(config, items)


# The per-commit profile (--miles-suite-profile=commit): a negative control and its positive check on
# one engine pair, training twice and the check that can fail, the doctor. The rest runs nightly.
COMMIT_PROFILE = frozenset({
    "test_applied_environment_passes_doctor", "test_ambient_environment", "test_negative_control[single]",
    "test_batch_invariance[single]", "test_run_twice_bitwise_equal", "test_checkpoint_check_can_fail"})


def _is_suite(item) -> bool:
    return getattr(getattr(item, "module", None), "__name__", "").startswith("pytest_miles.suite.")





TIMEOUT_NOTE = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter, config) -> None:
    note = config.stash.get(TIMEOUT_NOTE, None)
    if note:
        terminalreporter.write_line(note)


def machine_factor() -> float:
    """How much slower than an idle machine this one runs now: the 1-minute load average per core,
    at least 1 (a busy 2-core runner at load 9 gets 4.5 x the time)."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


def scale_timeouts(config, items) -> None:
    """pytest-timeout's limit (the project's `timeout` ini or --timeout), plus the engine start-up
    limit of this configuration for each engine a test may start (derived from the measured cold
    start with a margin, facts/kernel_caches.py), all scaled for this machine's load when the suite
    starts, so neither a cold kernel cache nor a busy runner turns a slow check into a failure. A
    test with its own timeout marker keeps it."""
    if not config.pluginmanager.has_plugin("timeout"):
        return
    # pytest-timeout's own order: --timeout, then PYTEST_TIMEOUT, then the ini value
    raw = getattr(config.option, "timeout", None) or os.environ.get("PYTEST_TIMEOUT") \
        or config.getini("timeout")
    try:
        limit = float(raw or 0)
    except ValueError:
        return  # pytest-timeout reports its own bad value
    if limit <= 0:
        return
    start = engine_start_limit(config)
    factor = machine_factor()
    changed = False
    for item in items:
        starts = max((n for name, n in ENGINE_FIXTURES.items() if name in getattr(item, "fixturenames", ())),
                     default=0)
        if item.get_closest_marker("timeout") is None and (starts or factor > 1.0):
            item.add_marker(pytest.mark.timeout(round((limit + starts * start) * factor)))
            changed = True
    if changed:
        config.stash[TIMEOUT_NOTE] = (f"suite timeouts: ({limit:.0f} s + {start:.0f} s per engine start-up a test "
                                      f"may pay) x {factor:.1f} (load per core at start)")
