"""Named negative controls shared by tests (fakes only as deliberate controls)."""

from __future__ import annotations


class StaleCache:
    """Negative control (a named fake): a real server behind a flush_cache that does nothing, so the
    reference is a cold prefill and every later request hits the prefix cache."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def flush_cache(self) -> None:
        pass
