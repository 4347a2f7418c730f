"""pytest11 entry point `miles`: options, markers and hooks, each a few lines into the session
object (`state.MilesSession`). Imports no torch, sglang, megatron or ray."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("pytest_miles.checks")

from pytest_miles import config as settings  # noqa: E402
from pytest_miles.errors import InputError  # noqa: E402
from pytest_miles.plugin import markers  # noqa: E402
from pytest_miles.plugin.fixtures import (  # noqa: E402,F401  (fixtures are found as attributes of the plugin)
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
    miles_trainer_pool,
    reference_engine,
    rl_loop_factory,
    sglang_engine,
    tiny_model_dir,
)
from pytest_miles.plugin.fixtures_cluster import (  # noqa: E402,F401
    miles_gpu_lease,
    miles_gpu_leaser,
    miles_ray_session,
    ray_cluster,
)
from pytest_miles.plugin.outcomes import verdicts  # noqa: E402
from pytest_miles.plugin.snapshots import raise_deferred  # noqa: E402
from pytest_miles.plugin.state import STATE, MilesSession, MilesState, state  # noqa: E402,F401

MARKERS = markers.MARKERS


def pytest_addoption(parser: pytest.Parser) -> None:
    settings.add_options(parser)
    markers.add_ini(parser)


def pytest_configure(config: pytest.Config) -> None:
    markers.register(config)
    try:
        session = MilesSession(config)  # every setting resolved and validated once, naming its source
        session.validate_inputs()
    except InputError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[STATE] = session
    from pytest_miles.placement.signals import ensure
    from pytest_miles.plugin.report_hooks import ReportHooks

    ensure()  # SIGTERM/SIGHUP: teardown and summary, as on Ctrl-C
    config.pluginmanager.register(ReportHooks(config), "miles-report")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return state(config).header()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    st = state(item.config)
    if markers.is_check(item):
        from pytest_miles.report.collector import CHECK_TEST

        item.user_properties.append((CHECK_TEST, item.nodeid))
    markers.check_requirements(item, st.hardware)


@pytest.hookimpl(wrapper=True, tryfirst=True, specname="pytest_runtest_setup")
def pytest_runtest_setup_verdicts(item: pytest.Item):
    """The whole setup phase (markers, fixtures, cached fixture errors): NotApplicable -> skip,
    Unavailable -> skip or, under --miles-require-gpu, fail."""
    with verdicts(state(item.config).settings.require_gpu):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Helpers running in this test record into its report lines and read its settings."""
    st = state(item.config)
    with st.recording(item), verdicts(st.settings.require_gpu):
        result = yield
    raise_deferred(item)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """A stop signal whose interruption the test swallowed ends the session after it (exit 2)."""
    result = yield
    from pytest_miles.placement.signals import raise_if_swallowed

    raise_if_swallowed()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Known upstream limitations -> XFAIL naming the reference; a non-strict unexpected pass -> XPASS."""
    rep = yield
    from pytest_miles.capabilities.verdict import adjust_report
    from pytest_miles.recording import failed_stage, finished_stages
    from pytest_miles.report.collector import STAGE_KEY, STAGES_KEY

    adjust_report(item, call, rep)
    where = failed_stage()
    if where and rep.failed:
        rep.user_properties.append((STAGE_KEY, where))  # the report's timeout line names the slow stage
    done = finished_stages()
    if done:
        rep.user_properties.append((STAGES_KEY, [[label, seconds] for label, seconds in done]))
    return rep
