"""pytest11 entry point: options, ini keys, markers and hooks. Imports no torch.

Logic lives in the modules named for it (options, hardware, doctor, fingerprint); this file
only wires them into pytest, as pytest-regressions and syrupy do.
"""

from __future__ import annotations

from functools import cached_property

import pytest

pytest.register_assert_rewrite("pytest_miles.checks")

from . import options  # noqa: E402
from .fixtures import (  # noqa: E402,F401  (fixtures are found as attributes of the plugin)
    determinism_snapshot,
    deterministic_env,
    engine,
    engine_factory,
    megatron_trainer_factory,
    miles_artefact_dir,
    miles_fingerprint,
    miles_hardware,
    miles_record,
    miles_settings,
    reference_engine,
    rl_loop_factory,
    sglang_engine,
    tiny_model_dir,
)
from .fixtures_cluster import miles_gpu_lease, miles_gpu_leaser, miles_ray_session, ray_cluster  # noqa: E402,F401
from .hardware import GPU_CLASSES, requirement_from_marks  # noqa: E402

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
assert {m.split(":")[0].split("(")[0] for m in MARKERS} >= set(GPU_CLASSES)  # noqa: S101

STATE = pytest.StashKey["MilesState"]()


class MilesState:
    """Per-session facts, computed on first use so that runs that never ask pay nothing."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

        from .report import Collector

        self.collector = Collector()

    def setting(self, name: str):
        return options.resolve(self.config, name)

    @cached_property
    def hardware(self):
        from .hardware import discover

        return discover(override=self.setting("gpu_class"))

    @cached_property
    def real_hardware(self):
        """The GPUs really here: devices, leases and engines follow these; --miles-gpu-class only
        pretends for markers and reports (a pretended H100 must not move a CPU torch to CUDA)."""
        from .hardware import discover

        return discover() if self.setting("gpu_class") else self.hardware

    @cached_property
    def progress(self):
        from .progress import TerminalProgress

        return TerminalProgress(self.config)

    def artefact_dir(self):
        """Where plots go: --miles-report-dir, else next to the report, else <rootdir>/.pytest-miles."""
        from pathlib import Path

        where = self.setting("report_dir") or next(
            (str(Path(p).parent) for p in (self.setting("report"), self.setting("report_html")) if p), None)
        path = Path(where) if where else self.config.rootpath / ".pytest-miles"
        path = path if path.is_absolute() else self.config.rootpath / path
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def fingerprint(self):
        from .fingerprint import collect

        return collect(self.hardware)


def state(config: pytest.Config) -> MilesState:
    return config.stash[STATE]


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    config.stash[STATE] = MilesState(config)
    from .shutdown import ensure

    ensure()  # SIGTERM/SIGHUP: teardown and summary, as on Ctrl-C
    config.pluginmanager.register(ReportHooks(config), "miles-report")
    for s in options.SETTINGS:  # bad values fail the run at once, naming their source
        try:
            options.resolve(config, s.name)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    if options.resolve(config, "capabilities"):  # a bad capability file fails the run at once, naming file and field
        from .capabilities import CapabilityError, load_capabilities, verdict

        try:
            load_capabilities(options.resolve(config, "capabilities"))
        except CapabilityError as exc:
            raise pytest.UsageError(f"{options.BY_NAME['capabilities'].cli}: {exc}") from None
        verdict.SESSION_FILE = options.resolve(config, "capabilities")  # CLI/ini too, not only the env
    if options.resolve(config, "gpu_class"):
        from .hardware import parse_override

        try:
            parse_override(options.resolve(config, "gpu_class"))
        except ValueError as exc:
            raise pytest.UsageError(f"{options.BY_NAME['gpu_class'].cli}: {exc}") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    from .doctor import run_doctor, summary

    st = state(config)
    findings = run_doctor(attention_backend=st.setting("attention_backend"), process_checks=False,
                          gpu=bool(st.hardware.nvidia))  # the pretended GPUs too: the header reports for them
    return [f"miles: {st.fingerprint.header()}", f"miles: {summary(findings)}"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _mark_check(item)
    _precision_skip(item)
    try:
        req = requirement_from_marks(item.iter_markers())
    except ValueError as exc:
        pytest.fail(f"{item.nodeid}: {exc}", pytrace=False)
    if not req.active:
        return
    st = state(item.config)
    reason = req.unmet(st.hardware)
    if reason is None:
        return
    if st.setting("require_gpu"):
        pytest.fail(f"{reason} (--miles-require-gpu turns this skip into a failure)", pytrace=False)
    # Report the skip at the test's location, as pytest's own skipif marks do.
    raise pytest.skip.Exception(reason, _use_item_location=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Known upstream limitations -> XFAIL naming the reference; not applicable -> SKIP (see
    pytest_miles.capabilities.verdict: the helpers raise, so they work in plain scripts too)."""
    rep = yield
    from .capabilities.verdict import adjust_report

    adjust_report(item, call, rep)
    return rep


# A test that uses one of these fixtures or markers is a determinism check: it appears in the
# report even when it skips or xfails before recording anything.
CHECK_FIXTURES = frozenset({
    "engine", "engine_factory", "reference_engine", "sglang_engine", "megatron_trainer_factory",
    "determinism_snapshot", "miles_record", "ray_cluster", "miles_ray_session", "deterministic_env"})
CHECK_MARKERS = frozenset({*GPU_CLASSES, "gpu", "gpus", "min_gpu_memory", "ray_gpus", "miles_precision"})


def _mark_check(item: pytest.Item) -> None:
    from .report import CHECK_TEST

    module = getattr(getattr(item, "module", None), "__name__", "")
    if (CHECK_FIXTURES & set(getattr(item, "fixturenames", ())) or module.startswith("pytest_miles.suite")
            or any(m.name in CHECK_MARKERS for m in item.iter_markers())):
        item.user_properties.append((CHECK_TEST, item.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Helpers running in this test record into its report lines and read its settings."""
    from . import recording
    from .report import KEY

    st = state(item.config)

    def record(check: str, outcome: str, figures: dict, duration: float) -> None:
        item.user_properties.append((KEY, {"check": check, "outcome": outcome, "figures": figures,
                                           "duration": round(duration, 3), "source": "helper",
                                           "reason": str(figures.pop("message", ""))[:20000]}))

    token = recording.CURRENT.set(recording.Recorder(
        record=record, setting=st.setting, progress=st.progress.callback,
        report_path=st.setting("report") or st.setting("report_html")))
    try:
        result = yield
    finally:
        recording.CURRENT.reset(token)
        st.progress.finish()
    from .fixtures import SNAPSHOT_DEFERRED

    deferred = item.stash.get(SNAPSHOT_DEFERRED, None)
    if deferred:  # snapshot checks that skipped ran all; the test skips (or fails) now, naming each
        deferred.raise_outcome()
    return result


def _precision_skip(item: pytest.Item) -> None:
    mark = item.get_closest_marker("miles_precision")
    if mark is None:
        return
    from .precision import cell_status, unsupported_on

    cell = cell_status(mark.kwargs["rollout"], mark.kwargs["train"])
    if cell.valid:
        reason = unsupported_on(cell.formats, state(item.config).hardware)
        if reason:
            raise pytest.skip.Exception(reason, _use_item_location=True)


class ReportHooks:
    """Collects check records from test reports (worker reports too, under xdist) and prints
    the determinism report. Registered per session, so it holds its config."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.touched: set[tuple[str, str]] = set()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        st = state(self.config)
        added = st.collector.add_report(report)
        self.touched.update(tuple(v) for k, v in report.user_properties if k == "miles_snapshot")
        if added and not hasattr(self.config, "workerinput"):
            try:  # checked at configure; a folder removed since must not abort the session
                self._write(st, complete=False)
            except OSError as exc:
                import warnings

                warnings.warn(f"--miles-report: cannot be written ({exc.strerror or exc})", stacklevel=1)

    def _write(self, st, complete: bool) -> list[str]:
        written = []
        path = st.setting("report")
        if path:
            st.collector.write(path, st.fingerprint.to_json(), complete=complete)
            written.append(str(path))
        html = st.setting("report_html")
        if html and complete:
            from .report_html import write_html

            write_html(html, st.collector.to_json(st.fingerprint.to_json()), st.hardware)
            written.append(str(html))
        return written

    def pytest_terminal_summary(self, terminalreporter) -> None:
        st = state(self.config)
        if st.collector.entries:
            terminalreporter.write_sep("=", "pytest-miles determinism report")
            terminalreporter.write_line(f"fingerprint: {st.fingerprint.header()}")
            for line in st.collector.lines():
                terminalreporter.write_line(line)
        if self.touched and not hasattr(self.config, "workerinput"):
            self._unused(terminalreporter, st)
        if not hasattr(self.config, "workerinput"):
            for path in self._write(st, complete=True):
                terminalreporter.write_line(f"pytest-miles report written to {path}")

    def _unused(self, terminalreporter, st) -> None:
        from .snapshots import SnapshotStore

        files = {f for f, _ in self.touched}
        store = SnapshotStore(self.config.rootpath / st.setting("snapshot_dir"))
        unused = sorted((f, r) for f, r in store.all_records() if f in files and (f, r) not in self.touched)
        if unused:
            terminalreporter.write_sep("-", f"{len(unused)} snapshot records not used by this run (kept, not deleted)")
            for f, r in unused[:50]:
                terminalreporter.write_line(f"  {f}: {r}")
