"""Fixtures of the plugin. Heavy classes are imported inside each fixture, never at import."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pytest_miles._xdist import is_worker
from pytest_miles.errors import Unavailable
from pytest_miles.plugin.snapshots import DeterminismSnapshot
from pytest_miles.plugin.state import state

if TYPE_CHECKING:  # pragma: no cover
    from pytest_miles.facts.environment import DeterministicEnvironment
    from pytest_miles.facts.fingerprint import Fingerprint
    from pytest_miles.facts.hardware import Hardware


def _state(config: pytest.Config):
    return state(config)


CPU_TORCH = "CPU-only torch: pip install torch --index-url https://download.pytorch.org/whl/cpu"


def require_extra(config: pytest.Config, modules: tuple[str, ...], what: str, extra: str, hint: str = "") -> None:
    """Unavailable (a skip; a failure under --miles-require-gpu) with the install hint when an extra is missing."""
    import importlib.util

    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    absent = [m for m in modules if missing(m)]
    if absent:
        raise Unavailable(f"{what} requires {', '.join(absent)}: pip install 'pytest-miles[{extra}]'"
                          + (f" ({hint})" if hint else ""))


@pytest.fixture(scope="session")
def miles_hardware(pytestconfig: pytest.Config) -> Hardware:
    """The GPUs this session may use (after the override and CUDA_VISIBLE_DEVICES)."""
    return _state(pytestconfig).hardware


@pytest.fixture(scope="session")
def miles_fingerprint(pytestconfig: pytest.Config) -> Fingerprint:
    """Everything that decides bitwise results on this machine; `.to_json()`, `.digest`."""
    return _state(pytestconfig).fingerprint


@pytest.fixture(scope="session")
def miles_settings(pytestconfig: pytest.Config):
    """Resolved pytest-miles settings (CLI > env > ini > default) as a callable: settings('trials')."""
    return _state(pytestconfig).setting


@pytest.fixture
def deterministic_env() -> Iterator[DeterministicEnvironment]:
    """The deterministic environment of the Miles reproducibility guide for one test, restored afterwards."""
    from pytest_miles.facts.environment import DeterministicEnvironment

    with DeterministicEnvironment() as env:
        yield env


# ---- engines -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """The embedded tiny seeded model as an HF checkpoint (config.json + safetensors, no tokenizer)."""
    require_extra(pytestconfig, ("torch", "safetensors"), "tiny_model_dir", "torch", CPU_TORCH)
    from pytest_miles.models.embedded import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-model"))


def _placement(request: pytest.FixtureRequest, st):
    """() -> RayCluster when --miles-placement=ray, else None (local subprocesses)."""
    if st.setting("placement") != "ray":
        return None
    return lambda: request.getfixturevalue("miles_ray_session")


def _ray_start(placement):
    """The engine factory's placement: None (engines start here) or each engine in a Ray actor."""
    if placement is None:
        return None
    from pytest_miles.engines.ray import ray_start

    return ray_start(placement)


@pytest.fixture(scope="session")
def engine_factory(request: pytest.FixtureRequest, pytestconfig: pytest.Config,
                   tmp_path_factory: pytest.TempPathFactory):
    """`engine_factory(kind, **options)`: one launch per configuration per session; asking for
    another configuration closes the live one first (GPU memory back). `.launches` counts.
    With --miles-placement=ray each engine is a Ray actor on the ray_cluster; under pytest-xdist
    GPU engines start on leased GPUs."""
    require_extra(pytestconfig, ("torch", "safetensors"), "the engine fixtures", "torch", CPU_TORCH)
    from pytest_miles.engines.factory import EngineFactory

    st = _state(pytestconfig)
    factory = EngineFactory(
        model_dir=lambda: st.setting("model") or str(_shape_model(tmp_path_factory, st.setting("model_shape"))),
        log_dir=tmp_path_factory.mktemp("engine-logs"),
        hardware=lambda: st.real_hardware,  # devices follow real GPUs; --miles-gpu-class pretends for markers
        attention_backend=st.setting("attention_backend"),
        startup_timeout=st.setting("engine_timeout"),
        device=st.setting("device"),
        extra_args=tuple(shlex.split(st.setting("sglang_args") or "")),
        start=_ray_start(_placement(request, st)),
        leaser=request.getfixturevalue("miles_gpu_leaser"),
        request_timeout=st.setting("engine_request_timeout"),
        kernel_cache_dir=st.setting("kernel_cache_dir"),
        cache_key=lambda: _kernel_cache_key(st),
    )
    try:
        yield factory
    finally:
        factory.close()


def _tiny_model(tmp_path_factory: pytest.TempPathFactory):
    return _shape_model(tmp_path_factory, "tiny")


def _kernel_cache_key(st) -> str:
    """The cache key of this machine's real stack (not the --miles-gpu-class pretence)."""
    from pytest_miles.facts.fingerprint import collect
    from pytest_miles.facts.kernel_caches import cache_key

    return cache_key(collect(st.real_hardware).to_json())


def _shape_model(tmp_path_factory: pytest.TempPathFactory, shape: str):
    """The embedded model of --miles-model-shape, written once per session under the basetemp root
    (shared by xdist workers, a file lock between them) and reused."""
    from pytest_miles.models.cache import cached_shape_dir

    return cached_shape_dir(tmp_path_factory.getbasetemp(), shape)


@pytest.fixture
def engine(engine_factory, miles_settings):
    """The engine chosen by --miles-engine (deterministic mode), shared across tests."""
    return engine_factory(miles_settings("engine"))


@pytest.fixture
def reference_engine(engine_factory):
    """The embedded torch engine in batch-invariant mode."""
    return engine_factory("reference")


@pytest.fixture
def sglang_engine(engine_factory):
    """A real SGLang server with --enable-deterministic-inference (skips without sglang or a GPU)."""
    return engine_factory("sglang")


# ---- trainers ------------------------------------------------------------------------------


@pytest.fixture
def megatron_trainer_factory(request: pytest.FixtureRequest, pytestconfig: pytest.Config,
                             tmp_path_factory: pytest.TempPathFactory):
    """`megatron_trainer_factory(seed=..., tensor_parallel=..., ...)` -> MegatronTrainer (real
    megatron-core in worker processes; cuda where an NVIDIA GPU is visible, else gloo on CPU).
    Takes TrainerConfig's fields as keywords, or `config=TrainerConfig(...)`.
    `transformer_impl="transformer_engine", precision=..., attention_backend=...` trains Miles'
    TE path; it skips with the reason where TE is missing or the GPU cannot run the precision.
    With --miles-placement=ray every rank is a Ray actor; under pytest-xdist ranks get leased GPUs."""
    return _trainer_maker(request, pytestconfig, tmp_path_factory)


@pytest.fixture(scope="session")
def rl_loop_factory(request: pytest.FixtureRequest, pytestconfig: pytest.Config,
                    tmp_path_factory: pytest.TempPathFactory, engine_factory):
    """`rl_loop_factory(engine="reference", iterations=3, seed=..., n_samples=..., stop_after=...)`
    -> LoopRun: the RL loop (rollout, reward, GRPO step, checkpoint, weight sync) on the engine
    factory's engine and a megatron-core trainer session; compare runs with
    `pytest_miles.scenarios.loop.assert_loops_bitwise_equal`. Session-scoped, so modules can share runs;
    `rl_loop_factory.shared(key, ...)` shares one run across pytest-xdist workers too."""

    from pytest_miles.scenarios.loop.factory import LoopFactory

    base = tmp_path_factory.getbasetemp()
    return LoopFactory(engine_factory=engine_factory, make_trainer=_trainer_maker(request, pytestconfig,
                                                                                 tmp_path_factory),
                       work_root=tmp_path_factory.mktemp("rl-loop"),
                       shared_root=base.parent if is_worker() else base)


@pytest.fixture(scope="session")
def miles_trainer_pool(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """The session's TrainerPool (megatron-core ranks kept for the session, a fresh model and global
    state every run: docs/trainers.md), or None with --miles-trainer-reuse=off. Ends with the session."""
    if _state(pytestconfig).setting("trainer_reuse") == "off":
        yield None
        return
    from pytest_miles.trainers.pool import TrainerPool

    with TrainerPool(tmp_path_factory.mktemp("megatron-pool")) as pool:
        yield pool


def _trainer_maker(request: pytest.FixtureRequest, pytestconfig: pytest.Config,
                   tmp_path_factory: pytest.TempPathFactory):
    st = _state(pytestconfig)
    require_extra(pytestconfig, ("torch", "megatron.core"), "megatron_trainer_factory", "megatron", CPU_TORCH)
    from pytest_miles.trainers.megatron import MegatronTrainer

    device = st.setting("device")
    if device == "auto":
        device = "cuda" if st.real_hardware.nvidia else "cpu"
    log_dir = tmp_path_factory.mktemp("megatron-logs")

    placement = _placement(request, st)
    leaser = request.getfixturevalue("miles_gpu_leaser")
    pool = request.getfixturevalue("miles_trainer_pool")

    def make(**kwargs):
        # a TrainerConfig says where it trains; it gets the session's log_dir if it has none
        config = kwargs.get("config")
        if config is None:
            kwargs.setdefault("device", device)
        if getattr(config, "log_dir", None) is None:
            kwargs.setdefault("log_dir", log_dir)
        if placement is not None and "launcher" not in kwargs:
            from pytest_miles.trainers.ray import RayRankLauncher

            kwargs["launcher"] = RayRankLauncher(placement())
        if leaser is not None:
            kwargs.setdefault("gpu_lease", lambda n, owner: leaser.acquire(n, owner=owner))
        kwargs.setdefault("hardware", st.hardware)
        kwargs.setdefault("pool", pool)
        return MegatronTrainer(**kwargs)  # PrecisionUnsupported skips; TE missing is Unavailable

    return make


@pytest.fixture
def miles_record(request: pytest.FixtureRequest):
    """`miles_record(check, kind="determinism", **figures)`: put a line in the determinism report for
    this test. `kind="refusal"` (a configuration refused by a rule, nothing measured) and
    `kind="setup"` (the environment the checks rely on) are counted apart from the determinism checks."""
    from pytest_miles.report.collector import KEY
    from pytest_miles.validation import choice

    def record(check: str, *, kind: str = "determinism", **figures):
        choice("miles_record(kind=)", kind, ("determinism", "refusal", "setup"))
        request.node.user_properties.append((KEY, {"check": check, "figures": figures, "kind": kind}))

    return record


@pytest.fixture
def miles_artefact_dir(pytestconfig: pytest.Config):
    """Where plots and other artefacts of the report go: --miles-report-dir, else next to the
    report, else <rootdir>/.pytest-miles; never pytest's rotating basetemp."""
    return _state(pytestconfig).artefact_dir()


@pytest.fixture
def determinism_snapshot(request: pytest.FixtureRequest) -> DeterminismSnapshot:
    """Record or compare exact digests of tokens, logprobs, tensors, manifests, loss curves."""
    return DeterminismSnapshot(request)
