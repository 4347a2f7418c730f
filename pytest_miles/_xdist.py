"""The one answer to "am I a pytest-xdist worker?", for the plugin and for the code below it."""

from __future__ import annotations

import os
from typing import Any


def worker_id(config: Any = None) -> str | None:
    """This process's xdist worker id ("gw0"), or None in the controller or without xdist.

    With a pytest config, xdist's own `workerinput`; without one (code that never sees pytest),
    the PYTEST_XDIST_WORKER variable xdist sets in every worker."""
    if config is not None:
        workerinput = getattr(config, "workerinput", None)
        return workerinput.get("workerid") if isinstance(workerinput, dict) else None
    return os.environ.get("PYTEST_XDIST_WORKER") or None


def is_worker(config: Any = None) -> bool:
    return worker_id(config) is not None
