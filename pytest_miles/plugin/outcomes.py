"""The one place a "not applicable here" becomes a pytest outcome.

Anything below the plugin raises `NotApplicable` (a skip) or `Unavailable` (a part this machine
lacks: a skip, or a failure under --miles-require-gpu) and stays usable from plain scripts; the
setup and call hooks turn them into pytest's outcomes here. Skips are reported at the test's
location, as pytest's own skipif marks are.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import pytest

from pytest_miles.errors import NotApplicable, Unavailable

REQUIRE_GPU = " (--miles-require-gpu turns this skip into a failure)"


def outcome_of(exc: NotApplicable, require_gpu: bool) -> BaseException:
    """The pytest outcome for a not-applicable verdict: skip, or fail for Unavailable under require_gpu."""
    if isinstance(exc, Unavailable) and require_gpu:
        return pytest.fail.Exception(f"{exc}{REQUIRE_GPU}", pytrace=False)
    return pytest.skip.Exception(str(exc), _use_item_location=True)


@contextmanager
def verdicts(require_gpu: bool) -> Generator[None, None, None]:
    """Around a test phase: NotApplicable/Unavailable -> skip or fail (see `outcome_of`)."""
    try:
        yield
    except NotApplicable as exc:
        raise outcome_of(exc, require_gpu) from None
