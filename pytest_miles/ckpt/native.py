"""The native reader of DCP `.metadata` (`_dcpscan`, C, built from ckpt/dcpscan/ where a compiler is
found at install): its module, or None where it was not built or the `native` setting turns it off
(PYTEST_MILES_NATIVE=0: the Python path only, to compare the two or to rule the native reader out).
"""

from __future__ import annotations

from typing import Any

__all__ = ["native_reader"]


def native_reader() -> Any:
    """The `_dcpscan` extension module, or None (not built, or switched off). A bad switch value is
    an InputError naming the variable and the accepted values."""
    import os

    # Neither the variable nor a config file set: the default (on), without importing the settings
    # machinery (~20 ms of `pytest-miles compare`'s start-up; exactly what resolve() returns then).
    if os.environ.get("PYTEST_MILES_NATIVE", "") != "" or os.environ.get("PYTEST_MILES_CONFIG", "") != "":
        from pytest_miles.config import resolve

        if not resolve(None, "native"):
            return None
    try:
        from pytest_miles.ckpt import _dcpscan
    except ImportError:
        return None
    return _dcpscan
