"""The markers pytest-miles registers, and what the setup hook makes of them."""

from __future__ import annotations

import pytest

from pytest_miles.errors import NotApplicable, Unavailable
from pytest_miles.facts.hardware import GPU_CLASSES, requirement_from_marks

MARKERS = (
    "gpu: needs at least one NVIDIA GPU; skipped otherwise (failed with --miles-require-gpu).",
    "gpus(n): needs at least n visible NVIDIA GPUs (of the marked GPU class, if any).",
    "min_gpu_memory(gib): needs GPUs with at least this much memory each, in GiB.",
    "ampere: needs an Ampere-generation GPU: sm_80 (A100), sm_86 (A10, A40, RTX 30xx) or sm_89 "
    "(Ada: L4, L40S, RTX 40xx; FP8-capable, unlike sm_80/86).",
    "hopper: needs a Hopper GPU, sm_90 (H100, H200, GH200).",
    "blackwell: needs a data-center Blackwell GPU, sm_100/sm_103 (B200, B300, GB200, GB300). Consumer "
    "Blackwell (sm_120, RTX 50xx) is a different family and is NOT included: use blackwell_consumer.",
    "blackwell_consumer: needs a consumer Blackwell GPU, sm_120 (RTX 50xx, RTX PRO 6000).",
    "ray_gpus(n): needs n GPUs on the Ray cluster of the ray_cluster fixture; skipped, with what the "
    "cluster has, otherwise.",
    "miles_precision(rollout, train): a rollout x training precision cell (set by precision_matrix()); "
    "skipped where this machine's GPU cannot run one of its formats.",
)
if not {m.split(":")[0].split("(")[0] for m in MARKERS} >= set(GPU_CLASSES):  # pragma: no cover
    raise RuntimeError("a GPU class has no marker")

# A test that uses one of these fixtures or markers is a determinism check: it appears in the
# report even when it skips or xfails before recording anything.
CHECK_FIXTURES = frozenset({
    "engine", "engine_factory", "reference_engine", "sglang_engine", "megatron_trainer_factory",
    "determinism_snapshot", "miles_record", "ray_cluster", "miles_ray_session", "deterministic_env"})
CHECK_MARKERS = frozenset({*GPU_CLASSES, "gpu", "gpus", "min_gpu_memory", "ray_gpus", "miles_precision"})


# pytest 9 added the ini key `strict_markers`; on pytest 9.0.x `--strict-markers` given through
# `addopts` is silently ignored (pytest-dev/pytest#14442, fixed in 9.1). The ini key is the one form
# that works on every pytest from 9.0 on, and the plugin gives it to pytest 8 too, so a repo can
# write `strict_markers = true` once for the whole supported range.
STRICT_MARKERS_BACKPORT = int(pytest.__version__.split(".")[0]) < 9


def add_ini(parser: pytest.Parser) -> None:
    if STRICT_MARKERS_BACKPORT:
        parser.addini("strict_markers", "Unregistered markers are errors (pytest 9's key; pytest-miles "
                      "gives it to pytest 8)", type="bool", default=False)


def register(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    if STRICT_MARKERS_BACKPORT and config.getini("strict_markers"):
        config.option.strict_markers = True


def is_check(item: pytest.Item) -> bool:
    module = getattr(getattr(item, "module", None), "__name__", "")
    return bool(CHECK_FIXTURES & set(getattr(item, "fixturenames", ())) or module.startswith("pytest_miles.suite")
                or any(m.name in CHECK_MARKERS for m in item.iter_markers()))


def check_requirements(item: pytest.Item, hardware) -> None:
    """Raise Unavailable when the GPU markers are not met here, NotApplicable when this GPU cannot
    run the marked precision cell; a malformed marker fails the test, naming it."""
    mark = item.get_closest_marker("miles_precision")
    if mark is not None:
        from pytest_miles.facts.precision import cell_status, unsupported_on

        cell = cell_status(mark.kwargs["rollout"], mark.kwargs["train"])
        reason = unsupported_on(cell.formats, hardware) if cell.valid else None
        if reason:
            raise NotApplicable(reason)
    try:
        req = requirement_from_marks(item.iter_markers())
    except ValueError as exc:
        pytest.fail(f"{item.nodeid}: {exc}", pytrace=False)
    reason = req.unmet(hardware) if req.active else None
    if reason is not None:
        raise Unavailable(reason)
