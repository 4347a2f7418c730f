"""Root conftest of the plugin's own tests: pytester drives the plugin as users meet it."""

pytest_plugins = ("pytester",)

# Modules whose module-scoped fixtures are costly (real DCP saves, megatron-core runs on gloo): under
# pytest-xdist's default `--dist load` their tests are spread over the workers and each worker that gets
# one builds the fixture again. Each line is one work unit, run whole by one worker; test_front and
# test_dcp_native share one unit because they share the session fixture `dcp_pairs` (tests/ckpt/conftest.py).
# Measured on the 2-core machine, `-n 2`: see docs/ci.md.
XDIST_UNITS = (
    ("tests/ckpt/test_front.py", "tests/ckpt/test_dcp_native.py"),
    ("tests/trainers/test_trainer_pool.py",),
    ("tests/trainers/test_trainers.py",),
)


def pytest_collection_modifyitems(config, items):
    """Tests that drive pytest itself (the ``pytester`` fixture) get the ``plugin_api`` marker: CI runs
    them again on the oldest supported pytest, where pytest's own behaviour can differ."""
    import pytest

    for item in items:
        if "pytester" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.plugin_api)


def pytest_configure(config):
    """Under `-n N` with the default `--dist load`, keep each of XDIST_UNITS on one worker (see there)."""
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "dist", "no") == "load":
        config.pluginmanager.register(_UnitScheduler(), "miles-tests-xdist-units")


class _UnitScheduler:
    """xdist's hook for choosing the scheduler: its load-scope scheduler, with the scope of a test being
    its unit in XDIST_UNITS, and each other test its own scope (as under `--dist load`). Test ids are
    unchanged (`--dist loadgroup` would append `@group` to them, which the snapshot fixture reads)."""

    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadScopeScheduling

        units = {path: paths[0] for paths in XDIST_UNITS for path in paths}

        class Scheduler(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return units.get(nodeid.split("::", 1)[0], nodeid)

        return Scheduler(config, log)
