"""Root conftest of the plugin's own tests: pytester drives the plugin as users meet it."""

pytest_plugins = ("pytester",)
