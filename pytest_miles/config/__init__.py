"""Configuration: the table of settings (`settings`) and their resolution, once per session (`resolve`)."""

from __future__ import annotations

from pytest_miles.config.resolve import Settings, resolve, resolve_all
from pytest_miles.config.settings import (
           BY_NAME,
           GROUP_TITLES,
           SETTINGS,
           Setting,
           add_options,
           render_help,
           type_name,
)

__all__ = ["BY_NAME", "GROUP_TITLES", "SETTINGS", "Setting", "Settings", "add_options", "render_help", "resolve",
           "resolve_all", "type_name"]
