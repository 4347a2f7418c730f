"""One updating line per long check on a terminal: `[miles] batch invariance [single] 7/10`.

Quiet where it would only add noise: under -q, when stdout is not a terminal (CI logs, pipes),
with CI set in the environment, and in pytest-xdist workers (their output is not a terminal).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from pytest_miles._xdist import is_worker


class TerminalProgress:
    def __init__(self, config) -> None:
        self.tr = config.pluginmanager.get_plugin("terminalreporter")
        self.enabled = bool(
            self.tr is not None and getattr(self.tr, "isatty", False) and config.get_verbosity() >= 0
            and not os.environ.get("CI") and not is_worker(config))
        self.live = False
        self.capture = config.pluginmanager.get_plugin("capturemanager")

    def _write(self, text: str, rewrite: bool) -> None:
        """Past pytest's output capture (the test is running), straight to the terminal."""
        import contextlib

        ctx = self.capture.global_and_fixture_disabled() if self.capture is not None else contextlib.nullcontext()
        with ctx:
            self.tr.rewrite(text, erase=True) if rewrite else self.tr.write(text)
            self.tr.flush()

    def callback(self, check: str) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        t0 = time.monotonic()

        def tick(done: int, total: int) -> None:
            if not self.live:
                self._write("\n", rewrite=False)
                self.live = True
            self._write(f"[miles] {check}: {done}/{total} ({time.monotonic() - t0:.0f} s)", rewrite=True)

        return tick

    def finish(self) -> None:
        """Clear the line after the test, so pytest's own output continues cleanly."""
        if self.live:
            self._write("", rewrite=True)
            self._write("\r", rewrite=False)
            self.live = False
