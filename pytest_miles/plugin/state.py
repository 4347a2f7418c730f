"""The session object the hooks and fixtures delegate to (as syrupy's SnapshotSession): settings
resolved once at configure, facts computed on first use, the report collector."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from pytest_miles.config import resolve_all
from pytest_miles.errors import InputError


class MilesSession:
    """Per-session state: `settings` (frozen, resolved once), hardware, fingerprint, collector."""

    def __init__(self, config: pytest.Config) -> None:
        from pytest_miles.report.collector import Collector

        self.config = config
        self.settings = resolve_all(config)  # every source, validated once; bad values raise InputError
        self.collector = Collector()

    def setting(self, name: str) -> Any:
        """One setting by name (helpers and the recorder ask by name)."""
        return getattr(self.settings, name)

    @cached_property
    def hardware(self):
        from pytest_miles.facts.hardware import discover

        return discover(override=self.settings.gpu_class)

    @cached_property
    def real_hardware(self):
        """The GPUs really here: devices, leases and engines follow these; --miles-gpu-class only
        pretends for markers and reports (a pretended H100 must not move a CPU torch to CUDA)."""
        from pytest_miles.facts.hardware import discover

        return discover() if self.settings.gpu_class else self.hardware

    @cached_property
    def progress(self):
        from pytest_miles.report.progress import TerminalProgress

        return TerminalProgress(self.config)

    @cached_property
    def fingerprint(self):
        from pytest_miles.facts.fingerprint import collect

        return collect(self.hardware)

    def validate_inputs(self) -> None:
        """Files and values a setting names, checked before any test: a capability file's cells,
        a GPU-class override. Raises InputError naming the setting."""
        from pytest_miles.config import BY_NAME

        if self.settings.capabilities:
            from pytest_miles.capabilities import load_capabilities

            try:
                load_capabilities(self.settings.capabilities)
            except InputError as exc:
                raise InputError(f"{BY_NAME['capabilities'].cli}: {exc}") from None
        if self.settings.gpu_class:
            from pytest_miles.facts.hardware import parse_override

            try:
                parse_override(self.settings.gpu_class)
            except ValueError as exc:
                raise InputError(f"{BY_NAME['gpu_class'].cli}: {exc}") from None

    def header(self) -> list[str]:
        from pytest_miles.facts.doctor import run_doctor, summary

        findings = run_doctor(attention_backend=self.settings.attention_backend, process_checks=False,
                              gpu=bool(self.hardware.nvidia))  # the pretended GPUs too: the header reports for them
        return [f"miles: {self.fingerprint.header()}", f"miles: {summary(findings)}"]

    @contextmanager
    def recording(self, item: pytest.Item) -> Iterator[None]:
        """While a test runs, helpers record into its report lines and read the session's settings."""
        from pytest_miles import recording
        from pytest_miles.report.collector import KEY

        def record(check: str, outcome: str, figures: dict, duration: float) -> None:
            kind = figures.pop(recording.KIND, "determinism")
            item.user_properties.append((KEY, {"check": check, "outcome": outcome, "figures": figures,
                                               "duration": round(duration, 3), "source": "helper", "kind": kind,
                                               "reason": str(figures.pop("message", ""))[:20000]}))

        token = recording.CURRENT.set(recording.Recorder(
            record=record, setting=self.setting, progress=self.progress.callback,
            report_path=self.settings.report or self.settings.report_html))
        try:
            yield
        finally:
            recording.CURRENT.reset(token)
            self.progress.finish()

    def artefact_dir(self) -> Path:
        """Where plots go: --miles-report-dir, else next to the report, else <rootdir>/.pytest-miles."""
        s = self.settings
        where = s.report_dir or next((str(Path(p).parent) for p in (s.report, s.report_html) if p), None)
        path = Path(where) if where else self.config.rootpath / ".pytest-miles"
        path = path if path.is_absolute() else self.config.rootpath / path
        path.mkdir(parents=True, exist_ok=True)
        return path


MilesState = MilesSession  # the name earlier releases used
STATE = pytest.StashKey[MilesSession]()


def state(config: pytest.Config) -> MilesSession:
    return config.stash[STATE]


def engine_start_limit(config: pytest.Config) -> float:
    """Seconds an engine of this session may take to become healthy: --miles-engine-timeout, else
    derived from the measured cold start of the session's engine and attention backend, with a
    margin (`pytest_miles.facts.kernel_caches.start_limit`)."""
    from pytest_miles.facts.kernel_caches import start_limit

    st = state(config)
    own = st.setting("engine_timeout")
    return float(own) if own else start_limit(st.setting("engine"), st.setting("attention_backend"))


def miles_setting(config: pytest.Config, name: str) -> Any:
    """A pytest-miles setting of this session by name (resolved once: CLI > env > config file > ini >
    default), for conftest hooks; inside a test, the `miles_settings` fixture."""
    from pytest_miles.config import BY_NAME

    if name not in BY_NAME:
        raise InputError(f"miles_setting({name!r}): not a pytest-miles setting; expected one of "
                         + ", ".join(sorted(BY_NAME)))
    return state(config).setting(name)
