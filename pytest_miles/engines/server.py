"""An engine behind an HTTP server in its own process tree, speaking SGLang's `/generate`.

`ServerEngine` owns the process: free port, deterministic environment, readiness by health
polling with a timeout, the log tail in every error, and a teardown that kills the whole
tree. `SGLangEngine` (real `python -m sglang.launch_server`) and `ReferenceServerEngine`
(the embedded model behind the same API, so CPU machines exercise the same code) build on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pytest_miles.engines.base import (
    EngineError,
    Output,
    SamplingParams,
    WeightNotServed,
    params_json,
    parse_metrics,
    sglang_arg,
    sglang_start_env,
    stream_merge,
)
from pytest_miles.engines.sglang_answers import continuation_logprobs, meta_of, output_of, token_logprobs
from pytest_miles.engines.start_refusals import explain_refusal
from pytest_miles.facts.environment import deterministic_env_vars
from pytest_miles.placement.ownership import disown, spawn
from pytest_miles.placement.processes import exited, free_port, kill_tree, log_contains, port_in_use, tail, wait_until
from pytest_miles.recording import note_stage, stage


class ServerEngine:
    name = "server"
    start_advice = ""  # what a start-up timeout adds: the measured cold start, how to warm the cache
    memory_marker: str | None = None  # a log line after which the server holds its static GPU memory

    def __init__(self, cmd: list[str], *, port: int, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 startup_timeout: float = 300.0, request_timeout: float = 300.0, log_dir: str | Path | None = None,
                 health_path: str = "/health") -> None:
        self.cmd, self.port, self.host = cmd, port, host
        self.url = f"http://{host}:{port}"
        self.env = {**os.environ, **deterministic_env_vars(), **(env or {})}
        self.startup_timeout, self.request_timeout = startup_timeout, request_timeout
        self.health_path = health_path
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="miles-engine-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}-{port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        # time.monotonic() of the spawn, of `memory_marker` in the log (background starts), of the first answer
        self.spawned_at = self.settled_at = self.ready_at = None
        self.log_offset, self.spawned_wall, self.ready_wall = 0, 0.0, None  # where this start's log begins, when
        self.pids: list[int] = []
        self.cancelled, self._spawn_lock = False, threading.Lock()
        self.warmup_seconds: float | None = None  # warm_up(): the first requests, kernels built at first use
        self.warmup_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, settled: threading.Event | None = None) -> ServerEngine:
        """Spawn the server and wait until it answers. `settled` (a start in the background) is set
        once the server's static GPU memory is allocated (`memory_marker` in its log; at spawn when
        it has none), and in any case when the start ends, so that the next start can begin."""
        t0 = time.monotonic()
        try:
            if port_in_use(self.port, self.host):
                raise EngineError(f"{self.name}: port {self.port} on {self.host} is already in use")
            since = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self._spawn_lock, open(self.log_path, "ab") as log:
                if self.cancelled:
                    raise EngineError(f"{self.name}: closed before it started")
                self.proc = proc = spawn(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env)
            self.spawned_at, self.log_offset, self.spawned_wall = t0, since, time.time()
            if settled is not None and self.memory_marker is None:
                self.settled_at = time.monotonic()
                settled.set()
            with stage(f"starting {self.name} (limit {self.startup_timeout:g} s)", hint=self.start_advice):
                ok = wait_until(lambda: self._probe(settled, since), self.startup_timeout, 0.5,
                                alive=lambda: proc.poll() is None)
            if not ok:
                if proc.poll() is not None:
                    log = tail(self.log_path)
                    why = explain_refusal(log, sglang_arg(self.cmd, "mem-fraction-static"))
                    raise EngineError(f"{self.name} {exited(proc.returncode)} while starting "
                                      f"(log {self.log_path}):\n{why + chr(10) if why else ''}{log}")
                advice = f"\n{self.start_advice}" if self.start_advice else ""
                raise EngineError(f"{self.name} did not become healthy within {self.startup_timeout:g} s "
                                  f"(stage: engine start-up; log {self.log_path}){advice}\n{tail(self.log_path)}")
        except BaseException:
            self.close()
            raise
        finally:
            if settled is not None:
                settled.set()
        self.ready_at, self.ready_wall = time.monotonic(), time.time()
        self.startup_seconds = self.ready_at - t0
        for phase, seconds in self.startup_phases():  # a start on the main thread: stages of its test
            note_stage(f"{self.name} start-up: {phase}", seconds)
        try:
            self.warm_up()
        except BaseException:  # not the server's answer (interrupted, a bug): the process must not outlive it
            self.close()
            raise
        return self

    def warmup_params(self) -> list[Any]:
        """The requests a started server answers before anything is measured (none here)."""
        return []

    def startup_phases(self) -> list[tuple[str, float]]:
        """[(phase, seconds)] of the last start, read from the server's log (none known here)."""
        return []

    def warm_up(self) -> None:
        """engines/warm_up.py: `warmup_params()` served once, then a cache flush."""
        from pytest_miles.engines.warm_up import warm_up

        warm_up(self)

    def _probe(self, settled: threading.Event | None, since: int) -> bool:
        if settled is not None and not settled.is_set() and log_contains(self.log_path, self.memory_marker, since):
            self.settled_at = time.monotonic()
            settled.set()
        return self._healthy()

    def cancel(self) -> None:
        """Stop it from any thread: a start under way fails (killed), one not yet spawned never spawns."""
        with self._spawn_lock:
            self.cancelled = True
        self.close()

    def __enter__(self) -> ServerEngine:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        proc, self.proc = self.proc, None  # one owner of the kill, whichever thread closes
        if proc is not None:
            self.pids = kill_tree(proc.pid) or self.pids
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            disown(proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP ------------------------------------------------------------------------------

    def responsive(self, timeout: float = 5.0) -> bool:
        """Alive and answering its health check within `timeout` (a SIGSTOP'd server is alive, not responsive)."""
        return self.alive and self._healthy(timeout)

    def _healthy(self, timeout: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _post(self, path: str, payload: Any | None) -> Any:
        if not self.alive:
            code = None if self.proc is None else self.proc.returncode
            raise EngineError(f"{self.name} is not running (exit code {code}); log tail:\n{tail(self.log_path)}")
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            err = EngineError(f"{self.name} {path}: HTTP {exc.code}: {exc.read()[:2000].decode(errors='replace')}")
            err.status = exc.code  # callers that tell SGLang's answers apart (get_weights_by_name)
            raise err from None
        except (urllib.error.URLError, OSError) as exc:
            time.sleep(0.5)
            state = "died" if not self.alive else "did not answer"
            code = self.proc.returncode if self.proc is not None else None
            raise EngineError(f"{self.name} {state} during {path} ({exc}; exit code {code}); log tail:\n"
                              f"{tail(self.log_path)}") from None
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:  # /flush_cache answers plain text
            return body.decode(errors="replace")

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Output]:
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompts: expected a non-empty list of non-empty token-id lists")
        res = self._post("/generate", {"input_ids": prompts, "sampling_params": params_json(params, len(prompts)),
                                       "return_logprob": True})
        if isinstance(res, dict):
            res = [res]
        if not isinstance(res, list) or len(res) != len(prompts):
            raise EngineError(f"{self.name}: /generate answered {len(res) if isinstance(res, list) else res!r} "
                              f"items for {len(prompts)} prompts")
        outs = [output_of(item, f"{self.name}: /generate") for item in res]
        return [Output(o.output_ids, o.logprobs, o.cached_tokens) for o in outs]  # a batch: no top-k, retractions

    def generate_one(self, prompt: list[int], params: SamplingParams | None = None, *, top_logprobs: int = 0,
                     stream: bool = False) -> Output:
        """One request as an RL rollout client sends it (/generate, one prompt), with the top-k
        logprob maps when `top_logprobs` > 0; `stream` reads SGLang's server-sent events."""
        payload = {"input_ids": list(prompt), "sampling_params": (params or SamplingParams()).to_sglang(),
                   "return_logprob": True, "stream": bool(stream)}
        if top_logprobs:
            payload["top_logprobs_num"] = int(top_logprobs)
        item = self._post_stream("/generate", payload) if stream else self._post("/generate", payload)
        if not isinstance(item, dict) or "meta_info" not in item:
            how = "a stream with no data event" if stream and item is None else f"{item!r:.300}"
            raise EngineError(f"{self.name}: /generate ({'stream' if stream else 'whole'}) answered {how}; "
                              f"log tail:\n{tail(self.log_path)}")
        return output_of(item, f"{self.name}: /generate ({'stream' if stream else 'whole'})")

    def _post_stream(self, path: str, payload: Any) -> Any:
        """The last `data:` object of a server-sent-event answer (SGLang sends cumulative output)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        last = None
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                for raw in r:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise EngineError(f"{self.name} {path} (stream): {chunk['error']}")
                    last = stream_merge(last, chunk)
        except (urllib.error.URLError, OSError) as exc:
            raise EngineError(f"{self.name} {path} (stream): {exc}; log tail:\n{tail(self.log_path)}") from None
        return last

    def metrics(self) -> dict[str, float]:
        """GET /metrics (Prometheus text; SGLang with --enable-metrics): name -> value, labels
        dropped (values of one name summed). {} when the server has no /metrics."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                text = r.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return {}
        return parse_metrics(text)

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """Input-token logprobs of one prefill. SGLang returns [logprob, token_id, text] per input
        position from logprob_start_len on; the continuation is located by its token ids, so an
        off-by-one in the server's convention cannot silently compare the wrong positions."""
        seq = list(prompt) + list(continuation)
        res = self._post("/generate", {
            "input_ids": seq, "return_logprob": True, "logprob_start_len": max(len(prompt) - 1, 0),
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
        where = f"{self.name}: /generate (score)"
        entries = meta_of(res, where).get("input_token_logprobs")
        pairs = token_logprobs(entries, where, "input_token_logprobs", res, allow_none=True)
        self.last_score_entries = entries
        return continuation_logprobs(pairs, continuation, max(len(prompt) - 1, 0), self.name)

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        """SGLang's POST /update_weights_from_disk: the RL loop's weight sync. A refusal (HTTP 400
        or success false) raises EngineError with the server's message."""
        res = self._post("/update_weights_from_disk", {"model_path": str(model_path)})
        if not isinstance(res, dict) or not res.get("success"):
            raise EngineError(f"{self.name} refused /update_weights_from_disk {model_path}: {res!r}")

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """SGLang's POST /get_weights_by_name {name, truncate_size}: the first `truncate_size` rows
        of the served tensor as float32 lists (a list of those per data-parallel rank when
        dp_size > 1), bounded by the request timeout. WeightNotServed for SGLang's HTTP 400 "Get
        parameter by name failed"; EngineError naming the endpoint where the server has none."""
        from pytest_miles.models.weights_by_name import FAILED

        try:
            res = self._post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})
        except EngineError as exc:
            status = getattr(exc, "status", None)
            if status == 400 and FAILED in str(exc):
                raise WeightNotServed(f"{self.name} answered HTTP 400 \"{FAILED}\" for {name!r} (log "
                                      f"{self.log_path})") from None
            if status in (404, 405):
                raise EngineError(f"{self.name} has no /get_weights_by_name endpoint (HTTP {status}); SGLang "
                                  "serves it (entrypoints/http_server.py)") from None
            raise
        if not isinstance(res, list):
            raise EngineError(f"{self.name} /get_weights_by_name {name!r}: expected a JSON list, got {res!r:.200}")
        return res

    def flush_cache(self) -> None:
        deadline = time.monotonic() + 60
        while True:  # SGLang answers 400 while requests are running
            try:
                self._post("/flush_cache", None)
                return
            except EngineError as exc:
                if "HTTP 400" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def server_info(self) -> dict[str, Any]:
        """The server's effective settings (SGLang's GET /get_server_info: server args + version),
        read once: what the witnesses and every report show, instead of what we asked for."""
        if getattr(self, "_server_info", None) is None:
            try:
                with urllib.request.urlopen(self.url + "/get_server_info",
                                            timeout=min(30.0, self.request_timeout)) as r:
                    self._server_info = json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise EngineError(f"{self.name} /get_server_info: {exc}") from None
        return self._server_info


class SGLangEngine(ServerEngine):
    """A real SGLang server (`python -m sglang.launch_server`) in deterministic mode, in the
    production configuration: CUDA graphs on unless the caller passes `disable_cuda_graph=True`
    or `--disable-cuda-graph` / `--sglang-disable-cuda-graph` in extra_args."""

    name = "sglang"
    # model_runner: the KV pool is sized from the free memory measured before the weights load, so
    # a second server on the GPU must not start before this line (engines/prestart.py)
    memory_marker = "Memory pool end"

    def __init__(self, model_path: str | Path, *, deterministic: bool = True, attention_backend: str = "flashinfer",
                 mem_fraction_static: float = 0.3, extra_args: list[str] | tuple[str, ...] = (),
                 port: int | None = None, skip_tokenizer_init: bool | None = None, disable_cuda_graph: bool = False,
                 max_total_tokens: int | None = None,
                 python: str = sys.executable, kernel_cache_dir: str | Path | None = None, **kw: Any) -> None:
        from pytest_miles.engines.sglang_chunking import check_deterministic_chunking
        from pytest_miles.facts.kernel_caches import cache_env, slow_start_advice

        model_path = Path(model_path)
        if not (model_path / "config.json").exists():
            raise EngineError(f"{model_path}: no config.json (not an HF model directory)")
        if skip_tokenizer_init is None:
            skip_tokenizer_init = not any((model_path / n).exists()
                                          for n in ("tokenizer.json", "tokenizer_config.json"))
        port = port or free_port()
        cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), "--attention-backend", attention_backend,
               "--mem-fraction-static", str(mem_fraction_static), "--random-seed", "42"]
        if deterministic:
            cmd.append("--enable-deterministic-inference")
        if skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        if disable_cuda_graph:
            cmd.append("--disable-cuda-graph")
        if max_total_tokens is not None:  # a KV pool fixed in advance (engines/prestart.py planned_pools)
            from pytest_miles import validation as v

            cmd += ["--max-total-tokens", str(v.integer("SGLangEngine(max_total_tokens=)", max_total_tokens,
                                                        minimum=1))]
        cmd += sglang_passthrough(extra_args)
        check_deterministic_chunking(deterministic, attention_backend, cmd, {**os.environ, **(kw.get("env") or {})})
        self.deterministic, self.attention_backend = deterministic, attention_backend
        self.start_advice = slow_start_advice("sglang", attention_backend)
        kw["env"] = {**sglang_start_env(), **cache_env(kernel_cache_dir), **(kw.get("env") or {})}
        super().__init__(cmd, port=port, health_path="/health", **kw)

    def startup_phases(self) -> list[tuple[str, float]]:
        """Where the last start went, from SGLang's own log lines (engines/sglang_startup.py)."""
        from pytest_miles.engines.sglang_startup import read_phases

        return read_phases(self.log_path, self.log_offset, self.spawned_wall, self.ready_wall) if self.spawned_wall \
            else []

    def warmup_params(self) -> list[SamplingParams]:
        """engines/warm_up.py: a greedy and a sampled request (min-p too with determinism off)."""
        from pytest_miles.engines.warm_up import sglang_warmup_params

        return sglang_warmup_params(self.deterministic)


def sglang_passthrough(args: list[str] | tuple[str, ...]) -> list[str]:
    """Miles' SGLANG_ARGS convention: `--sglang-foo x` -> `--foo x`; other args pass unchanged."""
    return [a.replace("--sglang-", "--", 1) if a.startswith("--sglang-") else a for a in args]
