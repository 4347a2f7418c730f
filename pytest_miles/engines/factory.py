"""Engine creation and reuse for the fixtures: one live engine per configuration."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_miles.engines.launch import SERVER_KINDS, EngineSpec, build_server, make_engine
from pytest_miles.errors import MilesError, Unavailable
from pytest_miles.recording import note_stage, stage


class EngineFactory:
    def __init__(self, *, model_dir: Callable[[], str], log_dir: Path, hardware: Callable[[], Any],
                 attention_backend: str = "flashinfer", startup_timeout: float | None = None, device: str = "auto",
                 extra_args: tuple[str, ...] = (),
                 start: Callable[[EngineSpec], Any] | None = None, leaser: Any = None,
                 request_timeout: float = 300.0, kernel_cache_dir: str | None = None,
                 cache_key: Callable[[], str] | None = None) -> None:
        self._model_dir, self.log_dir, self._hardware = model_dir, log_dir, hardware
        self.attention_backend, self.startup_timeout = attention_backend, startup_timeout
        self.device = device
        self.extra_args = tuple(extra_args)  # --miles-sglang-args, for every SGLang engine
        self.start = start  # spec -> engine started elsewhere (a Ray actor with --miles-placement=ray)
        self.leaser = leaser  # GpuLeaser under pytest-xdist: engines start on GPUs no other worker holds
        self.leases: list[Any] = []
        self.request_timeout = request_timeout  # --miles-engine-request-timeout
        # --miles-kernel-cache-dir: SGLang servers keep their JIT kernels there; after a start, a stamp
        # under the stack's cache key (the doctor's "warm") records it
        self.kernel_cache_dir, self._cache_key = kernel_cache_dir, cache_key
        self.notes: list[str] = []  # engines replaced because they stopped answering
        self.launches = 0
        self.live: dict[tuple, Any] = {}
        self.pending: dict[tuple, Any] = {}  # configuration -> prestart.Pending: starting in the background
        self.planned: set[tuple] = set()  # started by prestart: their GPU memory was planned together
        self.specs: dict[tuple, EngineSpec] = {}
        self.prebuild: Any = None  # flashinfer_prebuild.Prebuild, started with the background starts
        atexit.register(self.close)  # also on KeyboardInterrupt, whatever pytest's teardown did

    def model_path(self) -> str:
        """The model folder engines start from when a call names none (--miles-model or the shape's)."""
        return self._model_dir()

    def _device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self._hardware().nvidia else "cpu"

    def _need(self, kind: str) -> None:
        """SGLang engines need sglang and an NVIDIA GPU: Unavailable (a skip, a failure under
        --miles-require-gpu) otherwise."""
        if importlib.util.find_spec("sglang") is None:
            raise Unavailable(f"engine {kind!r} requires sglang (pip install 'pytest-miles[sglang]'); "
                              "it is not installed")
        if not self._hardware().nvidia:
            raise Unavailable(f"engine {kind!r} requires an NVIDIA GPU; found {self._hardware().describe()}")

    def __call__(self, kind: str = "reference", *, model: str | None = None, deterministic: bool = True,
                 attention_backend: str | None = None, extra_args: tuple[str, ...] = (), alongside: bool = False,
                 **options: Any):
        """`alongside=True` keeps the live engines running (two configurations at once, e.g. to
        interleave throughput measurements); by default a new configuration replaces the live one."""
        spec, key = self._resolve(kind, model, deterministic, attention_backend, extra_args, options)
        eng = self.live.get(key)
        if eng is not None and getattr(eng, "alive", True) and self._answers(eng):
            return eng
        if eng is not None:  # stopped or wedged: replaced below
            self.live.pop(key).close()
        if key in self.pending:
            return self._take(key)
        if not alongside:  # a new configuration: free the old engine (and its GPU memory) first
            self._close_unplanned()
        eng = self._make(spec)
        self._mark_warm(spec, eng)
        self.launches += 1
        self.live[key], self.specs[key] = eng, spec
        return eng

    def _resolve(self, kind: Any, model: Any, deterministic: Any, attention_backend: Any, extra_args: Any,
                 options: dict[str, Any]) -> tuple[EngineSpec, tuple]:
        """The spec of one call (checked: a bad argument starts nothing) and its configuration key."""
        spec = self.spec(kind, model=model, deterministic=deterministic, attention_backend=attention_backend,
                         extra_args=extra_args, options=options)
        if kind.startswith("sglang"):
            self._need(kind)
        return spec, (kind, model, deterministic, spec.attention_backend, spec.extra_args,
                      tuple(sorted((k, _hashable(v)) for k, v in options.items())))

    def prestart(self, calls: Iterable[dict[str, Any]]) -> list[str]:
        """Start these configurations now, in the background (each a dict of this factory's call
        arguments; server engines only: sglang, reference-server), so that their start-up overlaps
        whatever runs meanwhile; a later call of the same configuration waits for its start instead of
        launching another, and gets its error (with the server's log tail) if it failed. The starts
        are staggered and SGLang's memory fractions planned so that they fit on one GPU together
        (engines/prestart.py); prestarted engines stay live until close(). Returns the labels of what
        it started: none where engines start elsewhere (a Ray placement) or on leased GPUs
        (pytest-xdist), or for a configuration this machine cannot run (its test says why)."""
        from pytest_miles.engines.prestart import BESIDE_FRACTION, Pending, memory_fractions, planned_pools, small_pool
        from pytest_miles.placement.ownership import owner_tag

        if self.start is not None or self.leaser is not None:
            return []
        chosen: dict[tuple, EngineSpec] = {}
        for call in calls:
            call = dict(call)
            try:
                spec, key = self._resolve(call.pop("kind", "reference"), call.pop("model", None),
                                          call.pop("deterministic", True), call.pop("attention_backend", None),
                                          call.pop("extra_args", ()), call)
            except MilesError:  # Unavailable, a bad argument: the test that asks for it reports it
                continue
            if spec.kind in SERVER_KINDS and key not in self.live and key not in self.pending:
                chosen.setdefault(key, spec)
        if self.prebuild is None:  # FlashInfer's modules, built side by side (engines/flashinfer_prebuild.py)
            from pytest_miles.engines.flashinfer_prebuild import start_for

            self.prebuild = start_for([s for s in chosen.values() if s.kind == "sglang"],
                                      kernel_cache_dir=self.kernel_cache_dir, log_dir=self.log_dir)
        beside = {key for key, spec in chosen.items() if small_pool(spec)}  # not in the chain (prestart.py)
        pools = planned_pools({k: s for k, s in chosen.items() if k not in beside}, self._free_gpu_bytes())
        beside |= pools.keys()
        fractions = iter(memory_fractions(sum(s.kind == "sglang" and k not in beside for k, s in chosen.items())))
        after, limit, ports, labels = None, 0.0, set(), []
        owner_tag()  # the ownership watchdog exists before any thread spawns (processes die with pytest)
        for key, spec in chosen.items():
            opts = dict(spec.options)
            if spec.kind == "sglang":
                opts.setdefault("mem_fraction_static", BESIDE_FRACTION if key in beside else next(fractions))
            if key in pools:
                opts.setdefault("max_total_tokens", pools[key])
            opts.setdefault("port", _distinct_port(ports))
            spec = replace(spec, options=opts)
            try:  # built here: its environment is read now, on this thread, not while a test changes it
                server = build_server(spec)
            except MilesError:  # the test that asks for it starts it and reports the error
                continue
            if key not in beside:
                limit += spec.startup_timeout  # a start begins at the latest when the one before it ended
            label = describe(spec)
            # its warm-up requests (kernels built at first use) come after it answers: each may take a request's limit
            warm = len(server.warmup_params()) * server.request_timeout
            own = spec.startup_timeout if key in beside else limit
            pending = Pending(label, lambda s=server: s, None if key in beside else after, own + warm + 60)
            pending.advice = server.start_advice  # what a timeout while waiting for it says
            self.pending[key], self.specs[key] = pending, spec
            if key not in beside:
                after = pending.settled
            self.planned.add(key)
            self.launches += 1
            labels.append(label)
        return labels

    def _free_gpu_bytes(self) -> int | None:
        """The free memory of the GPU the engines start on (the first visible one), or None."""
        from pytest_miles.facts.hardware import gpu_free_bytes

        hw = self._hardware()
        gpus = getattr(hw, "nvidia", ()) if hw is not None else ()
        return gpu_free_bytes(gpus[0].uuid) if gpus else None

    def _take(self, key: tuple):
        """The engine of a background start, once started (raises its error)."""
        pending = self.pending.pop(key)
        with stage(f"waiting for {pending.label}, started in the background", hint=pending.advice):
            eng = pending.result()
        note_stage(f"starting {pending.label} in the background", eng.startup_seconds or 0.0)
        for phase, seconds in eng.startup_phases():  # a ServerEngine (launch.build_server): [] where none are known
            note_stage(f"{pending.label} start-up: {phase}", seconds)
        if self.prebuild is not None and not self.prebuild.noted and self.prebuild.finished():
            self.prebuild.noted = True
            note_stage(f"building FlashInfer's JIT modules side by side in the background "
                       f"({self.prebuild.summary()})", self.prebuild.seconds or 0.0)
        if getattr(eng, "warmup_seconds", None):
            note_stage(f"warming up {pending.label} in the background (kernels built at first use)", eng.warmup_seconds)
        self._mark_warm(self.specs[key], eng)
        self.live[key] = eng
        return eng

    @contextlib.contextmanager
    def lend(self, kind: str = "reference", *, model: str, deterministic: bool = True,
             **options: Any) -> Iterator[Any]:
        """`with engine_factory.lend(kind, model=DIR) as eng:` an engine serving DIR's weights for the
        block. A live or background-started engine of the same configuration whose model folder
        differs from DIR in its weights only (every other file equal: config.json, generation config)
        is lent: DIR's weights are loaded into it (update_weights_from_disk) and its own put back
        after the block, so that later tests find it as it started (closed if that fails).
        Otherwise the block gets an engine of its own, as `engine_factory(kind, model=DIR, ...)`."""
        spec, key = self._resolve(kind, model, deterministic, options.pop("attention_backend", None),
                                  options.pop("extra_args", ()), options)
        donors = [k for k, e in self.live.items() if getattr(e, "alive", True)] + list(self.pending)
        donor = next((k for k in donors if k[0] == key[0] and k[2:] == key[2:]
                      and same_but_weights(self.specs[k].model_dir, spec.model_dir)), None)
        if donor is None:
            yield self(kind, model=model, deterministic=deterministic, attention_backend=key[3],
                       extra_args=key[4], **options)
            return
        eng = self.live[donor] if donor in self.live else self._take(donor)
        eng.update_weights_from_disk(spec.model_dir)
        try:
            yield eng
        finally:
            try:
                eng.update_weights_from_disk(self.specs[donor].model_dir)
            except BaseException:
                self.live.pop(donor, None)
                eng.close()  # nobody may find it serving another model's weights
                raise

    def spec(self, kind: Any, *, model: Any, deterministic: Any, attention_backend: Any, extra_args: Any,
             options: dict[str, Any]) -> EngineSpec:
        """The EngineSpec of one call: this factory's defaults filled in, every argument checked
        (by EngineSpec). --miles-sglang-args come first, so the call's own arguments win."""
        if isinstance(extra_args, (list, tuple)):  # anything else is refused by the spec, named
            extra_args = (*self.extra_args, *extra_args)
        backend = self.attention_backend if attention_backend is None else attention_backend
        timeout = self.startup_timeout
        if timeout is None:  # derived from the configuration's measured cold start, with a margin
            from pytest_miles.facts.kernel_caches import start_limit

            timeout = start_limit(str(kind), str(backend))
        options = dict(options) if isinstance(options, dict) else options
        if kind == "sglang" and self.kernel_cache_dir and isinstance(options, dict):
            options.setdefault("kernel_cache_dir", self.kernel_cache_dir)
        return EngineSpec(kind, self._model_dir() if model is None else model, deterministic, backend, extra_args,
                          options, self._device(), str(self.log_dir), timeout, self.request_timeout)

    def _make(self, spec: EngineSpec):
        if self.start is not None:  # a placement: e.g. a Ray actor, the deterministic env in its runtime_env
            return self.start(spec)
        if self.leaser is None or not spec.gpus:
            return make_engine(spec)
        lease = self.leaser.acquire(spec.gpus, owner=f"engine {spec.kind}")
        if spec.kind in ("sglang", "reference-server"):  # a subprocess: give it the leased GPUs
            spec = replace(spec, options={**spec.options, "env": {**spec.options.get("env", {}), **lease.env}})
        else:  # in-process: what it spawns inherits this process's environment
            os.environ.update(lease.env)
        try:
            eng = make_engine(spec)
        except BaseException:  # an engine that never started must not keep the GPU from other workers
            lease.release()
            raise
        self.leases.append(lease)
        return eng

    def _mark_warm(self, spec: EngineSpec, eng: Any) -> None:
        seconds = getattr(eng, "startup_seconds", None)
        if (spec.kind == "sglang" and self.kernel_cache_dir and self._cache_key is not None and seconds
                and not spec.options.get("dump_hidden_states")):  # the dump engine captures no CUDA graphs
            from pytest_miles.facts.kernel_caches import mark_warm

            mark_warm(self.kernel_cache_dir, self._cache_key(), spec.kind, spec.attention_backend, seconds)

    def _answers(self, eng: Any) -> bool:
        """Whether a live engine still answers its health check (a short timeout). A wedged one
        (stopped, deadlocked) would make every request of the next test wait the full request
        timeout: it is replaced, and the report says so."""
        healthy = getattr(eng, "responsive", None)
        if healthy is None or healthy(min(5.0, self.request_timeout)):
            return True
        import warnings

        note = (f"pytest-miles: the {eng.name} engine (pid {getattr(eng.proc, 'pid', '?')}, log {eng.log_path}) did "
                f"not answer its health check within {min(5.0, self.request_timeout):g} s; it was killed and replaced "
                "by a fresh engine")
        self.notes.append(note)
        warnings.warn(note, stacklevel=3)
        return False

    def _close_unplanned(self) -> None:
        if not self.planned:
            self.close()
            return
        for key in [k for k in self.live if k not in self.planned]:
            self.live.pop(key).close()

    def close(self) -> None:
        """Stop every engine: those starting in the background (a start under way is killed) and
        the live ones; give the GPU leases back."""
        pending, self.pending = self.pending, {}
        live, self.live = self.live, {}
        self.planned = set()
        try:
            # all marked first, the last first: stopping a start settles it, which lets the next one begin
            # unless that one is already marked (in chain order the next could spawn in between; CI, 2026-12-04)
            for p in reversed(list(pending.values())):
                p.stop()
            for p in pending.values():
                p.cancel()
            for eng in live.values():
                eng.close()
        finally:
            prebuild, self.prebuild = self.prebuild, None
            if prebuild is not None:
                prebuild.stop()
            leases, self.leases = self.leases, []
            for lease in leases:
                lease.release()


def describe(spec: EngineSpec) -> str:
    """'the sglang engine (determinism on, --enable-metrics)': a configuration in a message."""
    extra = "".join(f" {a}" for a in spec.extra_args)
    return f"the {spec.kind} engine (determinism {'on' if spec.deterministic else 'off'}{',' if extra else ''}{extra})"


def _distinct_port(taken: set[int]) -> int:
    """A free port none of the engines starting together got (their HTTP servers bind late)."""
    from pytest_miles.placement.processes import free_port

    port = free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    return port


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def same_but_weights(a: str, b: str) -> bool:
    """Two model folders that differ at most in their weight files: every other file (config.json,
    generation_config.json, tokenizer files) byte-equal, no subfolders. The same folder is not."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return False
    try:
        files = [{p.name: p for p in d.iterdir() if not p.name.endswith(WEIGHT_FILES)} for d in (pa, pb)]
        if files[0].keys() != files[1].keys() or not all(p.is_file() for p in files[0].values()):
            return False
        return all(files[0][n].read_bytes() == files[1][n].read_bytes() for n in files[0])
    except OSError:
        return False


def _hashable(value: Any) -> Any:
    """An option's value as part of a configuration's key (env={...} is a dict)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, set)):
        return tuple(_hashable(v) for v in value)
    return value
