"""The determinism report's hooks: collect check records from test reports (worker reports too,
under xdist), print the summary, write the JSON and HTML reports."""

from __future__ import annotations

import pytest

from pytest_miles._xdist import is_worker
from pytest_miles.plugin.state import state


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
        if added and not is_worker(self.config):
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
            from pytest_miles.report.html import write_html

            write_html(html, st.collector.to_json(st.fingerprint.to_json()), st.hardware)
            written.append(str(html))
        return written

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        from pytest_miles.placement.signals import interruption

        self.interrupted = interruption(excinfo.value)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if getattr(self, "interrupted", None):  # which signal ended the session, above pytest's own line
            terminalreporter.write_line(self.interrupted, red=True, bold=True)
        st = state(self.config)
        if st.collector.entries:
            terminalreporter.write_sep("=", "pytest-miles determinism report")
            terminalreporter.write_line(f"fingerprint: {st.fingerprint.header()}")
            for line in st.collector.lines():
                terminalreporter.write_line(line)
        if self.touched and not is_worker(self.config):
            self._unused(terminalreporter, st)
        if not is_worker(self.config):
            for path in self._write(st, complete=True):
                terminalreporter.write_line(f"pytest-miles report written to {path}")

    def _unused(self, terminalreporter, st) -> None:
        from pytest_miles.snapshots.store import SnapshotStore

        files = {f for f, _ in self.touched}
        store = SnapshotStore(self.config.rootpath / st.setting("snapshot_dir"))
        unused = sorted((f, r) for f, r in store.all_records() if f in files and (f, r) not in self.touched)
        if unused:
            terminalreporter.write_sep("-", f"{len(unused)} snapshot records not used by this run (kept, not deleted)")
            for f, r in unused[:50]:
                terminalreporter.write_line(f"  {f}: {r}")
