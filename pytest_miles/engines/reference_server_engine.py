"""The embedded reference model behind SGLang's HTTP API in its own process (the program:
engines/reference_server.py): the served engine of the embedded default, a real subprocess and port."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pytest_miles.engines.server import ServerEngine
from pytest_miles.errors import InputError
from pytest_miles.placement.processes import free_port


class ReferenceServerEngine(ServerEngine):
    """The embedded model behind SGLang's HTTP API, in its own process (CPU or GPU)."""

    name = "reference-server"
    has_prefix_cache = False

    @property
    def batch_invariant(self) -> bool:
        """The earlier name of `deterministic` (read-only)."""
        return self.deterministic

    def __init__(self, model_dir: str | Path, *, deterministic: bool = False, port: int | None = None,
                 device: str = "cpu", python: str = sys.executable, threads: int | None = None,
                 batch_invariant: bool | None = None, max_total_tokens: int | None = None,
                 chunked_prefill_size: int | None = None, max_running_requests: int | None = None,
                 prefix_cache: bool = False, fault: str | None = None, **kw: Any) -> None:
        from pytest_miles.engines.reference import deterministic_switch
        from pytest_miles.engines.reference_server import FAULTS

        deterministic = deterministic_switch(deterministic, batch_invariant, type(self).__name__)
        port = port or free_port()
        cmd = [python, "-m", "pytest_miles.engines.reference_server", "--model", str(model_dir),
               "--port", str(port), "--device", device]
        if threads is not None:  # a tiny model on a busy CPU: thread sync costs more than the math
            cmd += ["--threads", str(threads)]
        if deterministic:
            cmd.append("--deterministic")
        for flag, v in (("--max-total-tokens", max_total_tokens), ("--chunked-prefill-size", chunked_prefill_size),
                        ("--max-running-requests", max_running_requests)):
            if v is not None:
                cmd += [flag, str(int(v))]
        if prefix_cache:
            cmd.append("--enable-prefix-cache")
        if fault is not None:  # a negative control: one named fault planted in the server
            if fault not in FAULTS:
                raise InputError(f"fault: {fault!r} is not a planted fault; accepted: {', '.join(FAULTS)}")
            cmd += ["--fault", fault]
        self.has_prefix_cache, self.fault = bool(prefix_cache), fault
        self.deterministic = deterministic
        kw.setdefault("startup_timeout", 120.0)
        super().__init__(cmd, port=port, **kw)
