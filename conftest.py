"""Root conftest of the plugin's own tests: pytester drives the plugin as users meet it."""

pytest_plugins = ("pytester",)


def pytest_collection_modifyitems(config, items):
    """Tests that drive pytest itself (the ``pytester`` fixture) get the ``plugin_api`` marker: CI runs
    them again on the oldest supported pytest, where pytest's own behaviour can differ."""
    import pytest

    for item in items:
        if "pytester" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.plugin_api)
