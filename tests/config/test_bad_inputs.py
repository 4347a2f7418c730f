"""Every bad input gets one clear error: a table of bad values for options, ini keys, environment
variables, config files, fixture arguments, markers, public helpers, CLI subcommands and
snapshot/report files.

For each case: the error names the offending thing (the option, the argument, the file) and says
what is accepted -- or the value is a documented acceptance (`OK`); the error is ours (a
ValueError/TypeError/... raised at the edge with our message, not a traceback from deep code); no
case hangs (pytest-timeout); the user's files are byte- and mode-identical afterwards. Settings go
through the real resolver with a real pytest Config (`pytester.parseconfig`), so CLI and ini
sources are the ones pytest hands the plugin; a handful of real sessions check the wiring.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_miles import config as options
from pytest_miles.snapshots.store import FORMAT, SnapshotError, SnapshotStore, config_digest, digest_of

pytestmark = pytest.mark.timeout(60)

OK = None  # a documented acceptance: no error expected


# ---- settings: option / env / ini, through the real resolver ------------------------------------

BAD_SETTINGS: list[tuple[str, str, str]] = [  # (setting, value, what the message must say)
    ("trials", "0", "integer >= 1"), ("trials", "-1", "integer >= 1"), ("trials", "abc", "not an integer"),
    ("trials", "1.5", "not an integer"), ("trials", "1e3", "not an integer"),
    ("engine_timeout", "-1", "finite number > 0"), ("engine_timeout", "0", "finite number > 0"),
    ("engine_timeout", "nan", "finite number"), ("engine_timeout", "inf", "finite number"),
    ("engine_timeout", "1e400", "finite number"), ("engine_timeout", "abc", "not a number"),
    ("engine_request_timeout", "0", "finite number > 0"), ("engine_request_timeout", "-5", "finite number > 0"),
    ("engine_request_timeout", "nan", "finite number"),
    ("ray_timeout", "0", "finite number > 0"), ("ray_timeout", "nan", "finite number"),
    ("ray_timeout", "-inf", "finite number"),
    ("gpu_lease_timeout", "-1", "finite number >= 0"), ("gpu_lease_timeout", "nan", "finite number"),
    ("gpu_lease_timeout", "x", "not a number"),
    ("tensor_parallel", "0", "integer >= 1"), ("tensor_parallel", "-2", "integer >= 1"),
    ("tensor_parallel", "2.5", "not an integer"),
    ("train_steps", "0", "integer >= 1"), ("train_steps", "many", "not an integer"),
    ("trials", "1" + "0" * 23, "<= 1000000"), ("train_steps", "9" * 40, "<= 1000000"),
    ("tensor_parallel", "100000", "<= 1024"), ("engine_timeout", "1e12", "7 days"),
    ("gpu_lease_timeout", "1e300", "7 days"),
    ("engine", "sglang2", "one of reference, reference-server"), ("engine", "vllm", "one of"),
    ("device", "gpu", "one of auto, cpu, cuda"), ("device", "tpu", "one of auto, cpu, cuda"),
    ("placement", "k8s", "one of local, ray"), ("gpu_lease", "always", "one of auto, on, off"),
    ("trainer_reuse", "yes", "one of on, off"),
    ("sglang_args", "--sglang-foo 'bar", "cannot be split"), ("sglang_args", 'a "b', "cannot be split"),
    ("ray_address", "nohost", "host:port"), ("ray_address", "host:0", "host:port"),
    ("ray_address", "host:99999", "host:port"), ("ray_address", ":6379", "host:port"),
    ("ray_address", "host:abc", "host:port"),
    ("model", "/nonexistent/model", "not a model folder"),
    ("attention_backend", "Flash Infer", "attention backend"), ("attention_backend", "fa3;rm -rf", "attention backend"),
]
BOOL_SETTINGS = [("require_gpu", "maybe"), ("snapshot_update", "2"), ("snapshot_regen_all", "sure")]


def _source(setting: options.Setting, kind: str) -> str:
    return {"cli": f"option {setting.cli}", "env": f"environment variable {setting.env}",
            "ini": f"ini key {setting.ini}"}[kind]


def _resolve(pytester: pytest.Pytester, name: str, value: str, kind: str, monkeypatch) -> Any:
    s = options.BY_NAME[name]
    for other in options.SETTINGS:  # the developer's own environment must not leak into the case
        if other.env:
            monkeypatch.delenv(other.env, raising=False)
    if kind == "env":
        monkeypatch.setenv(s.env, value)
        return options.resolve(pytester.parseconfig(), name)
    if kind == "ini":
        pytester.makeini(f"[pytest]\n{s.ini} = {value}\n")
        return options.resolve(pytester.parseconfig(), name)
    if s.kind == "bool":  # store_true on the CLI: no value to be bad
        pytest.skip("boolean options take no value on the command line")
    return options.resolve(pytester.parseconfig(f"{s.cli}={value}"), name)


@pytest.mark.parametrize("kind", ["cli", "env", "ini"])
@pytest.mark.parametrize(("name", "value", "says"), BAD_SETTINGS + [(n, v, "not a boolean") for n, v in BOOL_SETTINGS],
                         ids=lambda x: str(x)[:24])
def test_bad_setting_names_its_source_and_the_accepted_values(pytester, monkeypatch, name, value, says, kind):
    s = options.BY_NAME[name]
    with pytest.raises(ValueError) as info:
        _resolve(pytester, name, value, kind, monkeypatch)
    msg = str(info.value)
    assert msg.startswith(_source(s, kind)), f"the message does not name its source first: {msg}"
    assert says in msg, f"the message does not say what is accepted ({says!r}): {msg}"
    assert "\n" not in msg


def test_empty_values_are_refused_where_they_cannot_mean_unset(pytester, tmp_path):
    """`--miles-report=` (an empty option) and an empty value in a config file are refused, named;
    an empty environment variable or ini value means unset (documented in the README)."""
    for setting in ("report", "trials", "engine", "attention_backend"):
        s = options.BY_NAME[setting]
        with pytest.raises(ValueError, match=f"^option {s.cli}: an empty value is not accepted"):
            options.resolve(pytester.parseconfig(f"{s.cli}="), setting)
    path = tmp_path / "empty.toml"
    path.write_text("[rollout]\ntrials = ''\n")
    with pytest.raises(ValueError, match="empty value is not accepted"):
        options.resolve(None, "trials", environ={"PYTEST_MILES_CONFIG": str(path)})
    assert options.resolve(None, "report", environ={"PYTEST_MILES_REPORT": ""}) is None


def test_input_files_go_through_the_safe_door(tmp_path):
    """A config file that is a FIFO, /dev/zero, a folder, not UTF-8 or nested without end is refused,
    named, at once: never a hang, never a traceback, never memory without bound."""
    import os
    import time

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[rollout]\ntrials = '\xff\xfe'\n")
    deep = tmp_path / "deep.toml"
    deep.write_text("[rollout]\ntrials = " + "[" * 5000 + "]" * 5000 + "\n")
    cases = [(fifo, "FIFO"), ("/dev/zero", "character device"), (tmp_path, "directory"),
             (binary, "not UTF-8"), (deep, "")]
    for path, says in cases:
        t0 = time.monotonic()
        with pytest.raises(ValueError) as info:
            options.resolve(None, "trials", environ={"PYTEST_MILES_CONFIG": str(path)})
        assert time.monotonic() - t0 < 2, path
        assert str(path) in str(info.value) and says in str(info.value), str(info.value)


def test_a_path_setting_with_a_nul_character_is_named(tmp_path):
    """TOML can carry a NUL (\\u0000) that no file system takes: an InputError naming the setting, not os.stat's
    bare ValueError."""
    from pytest_miles.errors import InputError

    cfg = tmp_path / "nul.toml"
    cfg.write_text('[rollout]\ncapabilities = "caps\\u0000.toml"\n')
    with pytest.raises(InputError, match="capabilities.*a path without NUL characters"):
        options.resolve(None, "capabilities", environ={"PYTEST_MILES_CONFIG": str(cfg)})


def test_configure_refuses_bad_reports_and_huge_gpu_overrides(pytester, tmp_path):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(f"--miles-report-html={tmp_path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "is a folder" in result.stderr.str()
    result = pytester.runpytest("--miles-gpu-class=h100x99999999999")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "count of 1 to 1024" in result.stderr.str()


def test_setting_paths_that_cannot_be_written_are_refused_at_configure(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    before = _state(a_file)
    cases = [("report", str(tmp_path), "is a folder"), ("report", str(a_file / "x.json"), "cannot create the folder"),
             ("snapshot_dir", str(a_file), "is a file"), ("gpu_lease_dir", str(a_file), "is a file"),
             ("model", str(a_file), "not a model folder")]
    for name, value, says in cases:
        s = options.BY_NAME[name]
        with pytest.raises(ValueError, match=f"^environment variable {s.env}: .*{says}"):
            options.resolve(None, name, environ={s.env: value})
    assert _state(a_file) == before
    # a report into a missing folder: the folders are created (documented acceptance)
    deep = tmp_path / "new" / "deeper" / "report.json"
    assert options.resolve(None, "report", environ={"PYTEST_MILES_REPORT": str(deep)}) == str(deep)
    assert deep.parent.is_dir()


CONFIG_FILES = [
    ("[rollout]\ntrials = 3.7\n", "not an integer"), ("[rollout]\ntrials = true\n", "not an integer"),
    ("[rollout]\ntrials = 0\n", "integer >= 1"), ("[rollout]\nengine_timeout = nan\n", "finite number"),
    ("[rollout]\nengine_timeout = 'soon'\n", "not a number"), ("[bogus]\nx = 1\n", "unknown table [bogus]"),
    ("[rollout]\nbogus = 1\n", "has no setting 'bogus'"), ("[rollout\n", "not valid TOML"),
    ("[sglang]\nsglang_args = \"'x\"\n", "cannot be split"), ("[performance]\ndevice = 'gpu'\n", "one of auto"),
]


@pytest.mark.parametrize(("text", "says"), CONFIG_FILES, ids=range(len(CONFIG_FILES)))
def test_bad_config_file_names_file_table_and_key(tmp_path, text, says):
    path = tmp_path / f"miles-{hashlib.sha1(text.encode()).hexdigest()[:8]}.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        for s in options.SETTINGS:
            options.resolve(None, s.name, environ={"PYTEST_MILES_CONFIG": str(path)})
    assert str(path) in str(info.value) and says in str(info.value), str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="PYTEST_MILES_CONFIG: .*nope.toml'?: no such file"):
        options.resolve(None, "trials", environ={"PYTEST_MILES_CONFIG": str(tmp_path / "nope.toml")})


# ---- fixture arguments ------------------------------------------------------------------------------

TRAINER = [  # MegatronTrainer(**kwargs): refused before any rank starts
    ({"seed": "abc"}, "seed="), ({"seed": -1}, "seed="), ({"seed": 1.5}, "seed="), ({"seed": True}, "seed="),
    ({"seed": 2**40}, "seed="), ({"seed": None}, "seed="),
    ({"tensor_parallel": 0}, "tensor_parallel="), ({"tensor_parallel": -1}, "tensor_parallel="),
    ({"tensor_parallel": "2"}, "tensor_parallel="), ({"tensor_parallel": 3}, "does not divide the attention heads"),
    ({"tensor_parallel": 2, "world_size": 3}, "world_size 3 is not a multiple of tensor_parallel 2"),
    ({"world_size": 0}, "world_size="), ({"world_size": "2"}, "world_size="),
    ({"micro_batch_size": 0}, "micro_batch_size="), ({"micro_batch_size": -1}, "micro_batch_size="),
    ({"micro_batch_size": 1.5}, "micro_batch_size="),
    ({"lr": float("nan")}, "lr="), ({"lr": -1.0}, "lr="), ({"lr": 0}, "lr="), ({"lr": "1e-3"}, "lr="),
    ({"timeout": 0}, "timeout="), ({"timeout": float("inf")}, "timeout="),
    ({"device": "gpu"}, "device="), ({"device": None}, "device="),
    ({"deterministic": "no"}, "deterministic="), ({"deterministic": 0}, "deterministic="),
    ({"env": {"A": 1}}, "env="), ({"env": "A=1"}, "env="), ({"model": "gpt-tiny"}, "model="), ({"model": 3}, "model="),
    ({"model": "tiny-moe", "tensor_parallel": 2}, "tensor_parallel="),
]


@pytest.mark.parametrize(("kwargs", "says"), TRAINER, ids=lambda x: str(x)[:30])
def test_bad_trainer_arguments_are_refused_before_any_rank_starts(kwargs, says):
    from pytest_miles.trainers.megatron import MegatronTrainer, TrainerError

    with pytest.raises(TrainerError) as info:
        MegatronTrainer(**kwargs)
    assert says in str(info.value), str(info.value)


@pytest.mark.parametrize(("kwargs", "says"), TRAINER, ids=lambda x: str(x)[:30])
def test_bad_trainer_config_fields_are_named(kwargs, says):
    """TrainerConfig is where the trainer's arguments are checked (once); MegatronTrainer says the same."""
    from pytest_miles.errors import InputError
    from pytest_miles.trainers.config import TrainerConfig

    with pytest.raises(InputError) as info:
        TrainerConfig(**kwargs)
    assert says in str(info.value), str(info.value)


def test_a_trainer_config_is_checked_again_when_a_field_is_replaced():
    from dataclasses import FrozenInstanceError, replace

    from pytest_miles.errors import InputError
    from pytest_miles.trainers.config import TrainerConfig
    from pytest_miles.trainers.megatron import MegatronTrainer, TrainerError

    cfg = TrainerConfig(seed=7, tensor_parallel=2)
    assert MegatronTrainer(config=cfg).config is cfg
    assert MegatronTrainer(config=cfg, seed=8).config == replace(cfg, seed=8)
    with pytest.raises(InputError, match=r"megatron_trainer_factory\(seed=\): -1 is not accepted"):
        replace(cfg, seed=-1)
    with pytest.raises(TrainerError, match="tensor_parallel 3 does not divide the attention heads"):
        MegatronTrainer(config=cfg, tensor_parallel=3)
    with pytest.raises(TrainerError,
                       match=r"megatron_trainer_factory\(config=\): \{'seed': 1\} is not accepted"):
        MegatronTrainer(config={"seed": 1})
    with pytest.raises(TypeError, match="unexpected keyword argument.* sead; accepted: seed, model"):
        MegatronTrainer(sead=1)
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 9  # type: ignore[misc]


TRAIN = [
    ((0,), {}, "train(steps)"), (("3",), {}, "train(steps)"), ((1.5,), {}, "train(steps)"),
    ((None,), {}, "train(steps)"),
    ((2,), {"save_steps": [5], "save_dir": "SAVE"}, "train(save_steps=) entry"),
    ((2,), {"save_steps": [0], "save_dir": "SAVE"}, "train(save_steps=) entry"),
    ((2,), {"save_steps": "1", "save_dir": "SAVE"}, "train(save_steps=)"),
    ((2,), {"save_steps": [1]}, "no save_dir given"),
    ((2,), {"save_dir": 5}, "train(save_dir=)"), ((2,), {"load_dir": "MISSING"}, "nothing to resume from"),
    ((2,), {"save_dir": "A_FILE/sub"}, "not writable"),
]


@pytest.mark.parametrize(("args", "kwargs", "says"), TRAIN, ids=range(len(TRAIN)))
def test_bad_train_arguments_are_refused_before_any_rank_starts(tmp_path, args, kwargs, says):
    from pytest_miles.trainers.megatron import MegatronTrainer, TrainerError

    (tmp_path / "a-file").write_text("keep")
    subst = {"SAVE": tmp_path / "save", "MISSING": tmp_path / "missing", "A_FILE/sub": tmp_path / "a-file" / "sub"}
    kwargs = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    trainer = MegatronTrainer(log_dir=tmp_path / "logs")
    with pytest.raises(TrainerError) as info:
        trainer.train(*args, **kwargs)
    assert says in str(info.value), str(info.value)
    assert trainer.launches == 0, "a rank was started"
    assert (tmp_path / "a-file").read_text() == "keep"


ENGINE = [
    (("vllm",), {}, "engine_factory(kind)"), ((3,), {}, "engine_factory(kind)"), ((None,), {}, "engine_factory(kind)"),
    (("reference",), {"deterministic": "no"}, "deterministic="),
    (("reference",), {"deterministic": 1}, "deterministic="),
    (("reference",), {"deterministic": None}, "deterministic="),
    (("reference",), {"model": "/nonexistent"}, "not a model folder"), (("reference",), {"model": 5}, "model="),
    (("reference",), {"attention_backend": 5}, "attention_backend="),
    (("reference",), {"attention_backend": "Bad Name"}, "attention_backend="),
    (("reference",), {"extra_args": "--x 1"}, "extra_args="), (("reference",), {"extra_args": [1]}, "extra_args="),
]


@pytest.mark.parametrize(("args", "kwargs", "says"), ENGINE, ids=range(len(ENGINE)))
def test_bad_engine_factory_arguments_start_nothing(tmp_path, args, kwargs, says):
    from pytest_miles.engines.factory import EngineFactory

    factory = EngineFactory(model_dir=lambda: str(tmp_path), log_dir=tmp_path, hardware=lambda: None,
                            device="cpu")
    with pytest.raises(ValueError) as info:
        factory(*args, **kwargs)
    assert says in str(info.value), str(info.value)
    assert factory.launches == 0 and not factory.live


ENGINE_SPEC = [  # EngineSpec(...) built by hand (a placement, a script): every field checked
    ({"kind": "vllm"}, "engine_factory(kind)"), ({"deterministic": "yes"}, "deterministic="),
    ({"attention_backend": None}, "attention_backend="), ({"extra_args": "--tp 2"}, "extra_args="),
    ({"extra_args": ("--tp", 2)}, "extra_args="),
    ({"options": [("tp_size", 2)]}, "engine_factory(**options)"),
    ({"device": "auto"}, "EngineSpec(device=)"), ({"startup_timeout": 0}, "EngineSpec(startup_timeout=)"),
    ({"startup_timeout": float("nan")}, "EngineSpec(startup_timeout=)"),
    ({"request_timeout": float("inf")}, "EngineSpec(request_timeout=)"),
    ({"request_timeout": -1.0}, "EngineSpec(request_timeout=)"), ({"log_dir": ""}, "EngineSpec(log_dir=)"),
    ({"model_dir": "MISSING"}, "not a model folder"),
    ({"extra_args": ("--tp-size=two",)},
     "SGLang argument --tp-size: 'two' is not an integer tensor parallel size"),
    # every flag parses, as argparse's
    ({"extra_args": ("--tp", "two", "--tp", "2")}, "SGLang argument --tp: 'two'"),
    ({"options": {"tp_size": "x"}}, "engine option tp_size: 'x' is not an integer"),
    ({"options": {"tp_size": 1.5}}, "engine option tp_size: 1.5 is not an integer"),
    # a deterministic chunk below SGLang's prefill alignment would starve every longer prompt
    ({"extra_args": ("--chunked-prefill-size", "128")}, "--chunked-prefill-size 128 with determinism on"),
    ({"extra_args": ("--sglang-chunked-prefill-size=x",)}, "'x' is not an integer"),
    ({"options": {"env": "A=1"}}, "engine_factory(env=)"),
    ({"extra_args": ("--chunked-prefill-size", "64"), "options": {"env": {
        "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE": "small"}}}, "expected an integer number of tokens"),
]


@pytest.mark.parametrize(("fields", "says"), ENGINE_SPEC, ids=range(len(ENGINE_SPEC)))
def test_bad_engine_spec_fields_are_named(tmp_path, fields, says):
    from pytest_miles.engines.launch import EngineSpec
    from pytest_miles.errors import InputError

    (tmp_path / "config.json").write_text("{}")
    good = dict(kind="sglang", model_dir=str(tmp_path), deterministic=True, attention_backend="triton",
                extra_args=(), options={}, device="cuda", log_dir=str(tmp_path), startup_timeout=60.0,
                request_timeout=30.0)
    fields = {k: str(tmp_path / "missing") if v == "MISSING" else v for k, v in fields.items()}
    with pytest.raises(InputError) as info:
        EngineSpec(**{**good, **fields})
    assert says in str(info.value), str(info.value)
    spec = EngineSpec(**{**good, "extra_args": ["--tp", "2"]})
    assert spec.extra_args == ("--tp", "2"), "a list is taken as a tuple"


# ---- public helpers and markers -------------------------------------------------------------------


def _helpers() -> list[tuple[str, Callable[[], Any], type, str]]:
    import pytest_miles as pm
    from pytest_miles.placement.leases import GpuLeaser, LeaseError
    from pytest_miles.report.plot import plot_deviation

    def leaser():  # made when a case runs (in a folder that goes with it), not when the cases are listed
        import tempfile

        return GpuLeaser(tempfile.mkdtemp(prefix="miles-bad-inputs-"), ["0"], timeout=0)
    return [
        ("assert_batch_invariant(None)", lambda: pm.assert_batch_invariant(None), TypeError,
         "engine: None is not an engine"),
        ("assert_batch_invariant('x')", lambda: pm.assert_batch_invariant("x"), TypeError, "is not an engine"),
        ("assert_runs_bitwise_equal(None, None)", lambda: pm.assert_runs_bitwise_equal(None, None), TypeError,
         "is not a training run"),
        ("assert_runs_bitwise_equal(1, 2)", lambda: pm.assert_runs_bitwise_equal(1, 2), TypeError,
         "is not a training run"),
        ("validate_precision_config(rollout=8)", lambda: pm.validate_precision_config(rollout=8, train="bf16"),
         ValueError, "rollout: 8 is not a precision format"),
        ("validate_precision_config(None)", lambda: pm.validate_precision_config(None, "bf16"), ValueError,
         "rollout: None"),
        ("validate_precision_config('bf17')", lambda: pm.validate_precision_config("bf17", "bf16"), ValueError,
         "unknown precision format 'bf17'"),
        ("validate_precision_config(train=5)", lambda: pm.validate_precision_config("bf16", 5), ValueError,
         "train: unknown precision format 5"),
        ("validate_precision_config([])", lambda: pm.validate_precision_config([], "bf16"), ValueError,
         "no precision format"),
        ("validate_precision_config(gpu='zzz')", lambda: pm.validate_precision_config("bf16", "bf16", gpu="zzz"),
         ValueError, "'zzz'"),
        ("precision_matrix(gpu='zzz')", lambda: pm.precision_matrix(gpu="zzz"), ValueError, "'zzz'"),
        ("assert_logprob_drift(max_abs_diff=nan)",
         lambda: pm.assert_logprob_drift("bf16", "bf16", max_abs_diff=math.nan), ValueError, "max_abs_diff="),
        ("assert_logprob_drift(max_abs_diff='0.1')",
         lambda: pm.assert_logprob_drift("bf16", "bf16", max_abs_diff="0.1"), ValueError, "max_abs_diff="),
        ("measure_logprob_drift('fp9')", lambda: pm.measure_logprob_drift("fp9", "bf16"), ValueError, "'fp9'"),
        ("assert_resume_equivalent(steps=1)", lambda: pm.assert_resume_equivalent(None, 1, "/tmp"), ValueError,
         "steps: 1"),
        ("compare_checkpoints(missing)", lambda: pm.compare_checkpoints("/nonexistent/a", "/nonexistent/b"),
         Exception, "/nonexistent/a"),
        ("discover(override='zzz')", lambda: pm.discover(override="zzz"), ValueError, "'zzz'"),
        ("plot_deviation(path=a folder)", lambda: plot_deviation({1: 0.0}, "/", "t"), ValueError, "is a folder"),
        ("plot_deviation(path under /proc)", lambda: plot_deviation({1: 0.0}, "/proc/self/nope/p.png", "t"), ValueError,
         "cannot create the folder"),
        ("GpuLeaser.acquire(0)", lambda: leaser().acquire(0), LeaseError, "n=0"),
        ("GpuLeaser.acquire('2')", lambda: leaser().acquire("2"), LeaseError, "n='2'"),
        ("GpuLeaser.acquire(9)", lambda: leaser().acquire(9), LeaseError, "needs 9 GPU(s)"),
    ]


HELPER_IDS = [h[0] for h in _helpers()]


@pytest.mark.parametrize("case", HELPER_IDS)
def test_bad_helper_arguments_are_named(case):
    import shutil
    import tempfile

    _, call, exc, says = next(h for h in _helpers() if h[0] == case)
    tmp = tempfile.mkdtemp(prefix="miles-bad-helpers-")
    try:
        with pytest.MonkeyPatch.context() as mp:  # every folder a case makes goes with it
            mp.setattr(tempfile, "tempdir", tmp)
            with pytest.raises(exc) as info:
                call()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert says in str(info.value), str(info.value)
    _not_deep(info)


ENGINE_CHECKS = [({"mode": "bogus"}, "mode: 'bogus'"), ({"trials": 0}, "trials"), ({"trials": "3"}, "trials")]


@pytest.mark.parametrize(("kwargs", "says"), ENGINE_CHECKS, ids=range(len(ENGINE_CHECKS)))
def test_bad_check_arguments_are_named(tiny_model_dir, kwargs, says):
    from pytest_miles import assert_batch_invariant
    from pytest_miles.engines.reference import ReferenceEngine

    with pytest.raises(ValueError) as info:
        assert_batch_invariant(ReferenceEngine(tiny_model_dir), **kwargs)
    assert says in str(info.value)


RECORD_NAMES = [None, 5, "", "a::b", b"bytes", ("t",)]


@pytest.mark.parametrize("name", RECORD_NAMES, ids=repr)
def test_bad_snapshot_record_names_are_refused(name):
    from pytest_miles.validation import check_record_name

    with pytest.raises(ValueError, match=r"determinism_snapshot.check\(name\)"):
        check_record_name(name)


# ---- snapshot files -----------------------------------------------------------------------------------


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), stat.S_IMODE(path.stat().st_mode)


def _good_file() -> dict:
    fp = {"cpu": "x"}
    rec = {"kind": "ints", "digest": digest_of([1, 2]), "value": [1, 2]}
    return {"format": FORMAT, "configurations": {config_digest(fp): {"fingerprint": fp, "records": {"t::r": rec}}}}


def _edit(fn: Callable[[dict], Any]) -> str:
    data = _good_file()
    fn(data)
    return json.dumps(data)


def _conf(d: dict) -> dict:
    return next(iter(d["configurations"].values()))


SNAPSHOT_FILES = [
    ("not json", "{", "corrupt snapshot file"),
    ("binary", b"\xff\xfe\x00garbage", "corrupt snapshot file"),
    ("a list", "[]", "not a pytest-miles snapshot file"),
    ("wrong format", json.dumps({"format": "other/1", "configurations": {}}), "not a pytest-miles snapshot file"),
    ("configurations list", json.dumps({"format": FORMAT, "configurations": []}), "not a pytest-miles snapshot file"),
    ("records list", _edit(lambda d: _conf(d).update(records=[1, 2])), "'records' is an array"),
    ("record without digest", _edit(lambda d: _conf(d)["records"]["t::r"].pop("digest")), "record 't::r' is malformed"),
    ("record not a dict", _edit(lambda d: _conf(d)["records"].update({"t::r": 5})), "record 't::r' is malformed"),
    ("value edited", _edit(lambda d: _conf(d)["records"]["t::r"].update(value=[1, 3])), "edited by hand"),
    ("fingerprint edited", _edit(lambda d: _conf(d)["fingerprint"].update(cpu="y")), "edited by hand"),
    ("configuration not a dict", json.dumps({"format": FORMAT, "configurations": {"k": 1}}),
     "configuration k is a number, expected an object"),
]


@pytest.mark.parametrize(("label", "content", "says"), SNAPSHOT_FILES, ids=[c[0] for c in SNAPSHOT_FILES])
@pytest.mark.parametrize("update", [False, True], ids=["compare", "update"])
def test_bad_snapshot_files_are_named_and_left_untouched(tmp_path, label, content, says, update):
    store = SnapshotStore(tmp_path, update=update)
    path = store.path_for("test_m.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.chmod(path, 0o644)
    before = _state(path)
    with pytest.raises(SnapshotError) as info:
        store.check("test_m.py", "t::r", [1, 2], {"cpu": "x"})
    assert str(path) in str(info.value) and says in str(info.value), str(info.value)
    assert _state(path) == before, "the user's snapshot file was changed"


VALUES = [(object(), "cannot snapshot a object"), ({1, 2}, "cannot snapshot a set"),
          ({1: "a", "1": "b"}, "collide"), (print, "cannot snapshot a builtin_function_or_method")]


@pytest.mark.parametrize(("value", "says"), VALUES, ids=range(len(VALUES)))
def test_unsnapshottable_values_are_refused(tmp_path, value, says):
    with pytest.raises(SnapshotError, match=says):
        SnapshotStore(tmp_path, update=True).check("test_m.py", "t::v", value, {"cpu": "x"})
    assert not list(tmp_path.rglob("*.json"))


def test_bytes_values_modes_and_a_read_only_folder_are_accepted(tmp_path):
    """Documented acceptances: bytes are snapshotted exactly; a rewrite keeps the file's mode and
    leaves no temporary; comparing works on a read-only folder; stale temporaries of a killed
    writer are removed by the next write."""
    store = SnapshotStore(tmp_path, update=True)
    assert store.check("test_m.py", "t::b", b"\x00\xff", {"cpu": "x"}).status == "recorded"
    path = store.path_for("test_m.py")
    os.chmod(path, 0o640)
    (path.parent / f"{path.name}abc123.tmp").write_text("left by a SIGKILL")
    assert store.check("test_m.py", "t::c", [1.5], {"cpu": "x"}).status == "recorded"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not list(tmp_path.rglob("*.tmp"))
    os.chmod(tmp_path, 0o555)
    try:
        ro = SnapshotStore(tmp_path)
        assert ro.check("test_m.py", "t::b", b"\x00\xff", {"cpu": "x"}).status == "passed"
        assert ro.check("test_m.py", "t::b", b"\x00\xfe", {"cpu": "x"}).status == "failed"
    finally:
        os.chmod(tmp_path, 0o755)


# ---- CLI subcommands ----------------------------------------------------------------------------------

CLI = [
    (["doctor", "--gpu-class", "zzz"], "'zzz'"), (["fingerprint", "--gpu-class", "zzz"], "'zzz'"),
    (["fingerprint", "--gpu-class", "h100x0"], "h100x0"), (["matrix", "--gpu", "zzz"], "--gpu"),
    (["compare", "/nonexistent/a", "/nonexistent/b"], "/nonexistent/a"),
    (["manifest", "/nonexistent/ckpt"], "/nonexistent/ckpt: no such file or directory"),
    (["capabilities", "--sglang-version", "garbage"], "--sglang-version 'garbage': not a version"),
    (["capabilities", "--file", "/nonexistent/caps.toml"], "/nonexistent/caps.toml"),
    (["manifest", "EMPTY", "-o", "/nonexistent/dir/m.json"], "EMPTY"),
    (["bogus"], "invalid choice"), (["compare", "only-one"], "required"),
    (["doctor", "--attention-backend"], "expected one argument"),
    (["fingerprint", "--nope"], "unrecognized arguments"), ([], "required"),
    (["doctor", "--sglang-tp", "0"], "--sglang-tp: 0 is not accepted"),
    (["doctor", "--sglang-tp", "-1"], "--sglang-tp"), (["doctor", "--sglang-tp", "1" + "0" * 23], "1..1024"),
    (["doctor", "--train-env-vars", "[" * 3000], "--train-env-vars"),
    (["doctor", "--sglang-version", "0.5.9"], "--sglang-version: '0.5.9' is not a version the capability data"),
]


@pytest.mark.parametrize(("argv", "says"), CLI, ids=lambda x: " ".join(x)[:40] if isinstance(x, list) else None)
def test_cli_never_prints_a_traceback_for_user_input(tmp_path, capsys, argv, says):
    from pytest_miles.cli import main

    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    says = str(tmp_path / "empty") if says == "EMPTY" else says
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "Traceback" not in err and says in err, err
    assert not (Path("/nonexistent")).exists()


def test_cli_debug_shows_the_traceback(capsys):
    from pytest_miles.cli import main

    with pytest.raises(ValueError, match="zzz"):
        main(["fingerprint", "--gpu-class", "zzz", "--debug"])


# ---- wiring: real sessions ------------------------------------------------------------------------

WIRING = [
    (["--miles-trials=0"], {}, "option --miles-trials: 0 is not accepted; expected an integer >= 1"),
    (["--miles-engine-timeout=1e400"], {}, "option --miles-engine-timeout: inf"),
    (["--miles-sglang-args=--sglang-x 'y"], {}, "option --miles-sglang-args"),
    (["--miles-report=REPORT_DIR"], {}, "option --miles-report: "),
    ([], {"PYTEST_MILES_GPU_LEASE_TIMEOUT": "nan"}, "environment variable PYTEST_MILES_GPU_LEASE_TIMEOUT: nan"),
    (["--miles-gpu-class=zzz"], {}, "--miles-gpu-class"),
]


@pytest.mark.parametrize(("args", "env", "says"), WIRING, ids=range(len(WIRING)))
def test_bad_settings_fail_a_real_session_at_configure(pytester, monkeypatch, args, env, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (pytester.path / "reports").mkdir()
    args = [a.replace("REPORT_DIR", str(pytester.path / "reports")) for a in args]
    pytester.makepyfile("def test_one():\n    pass\n")
    result = pytester.runpytest("-p", "no:randomly", *args)  # in-process: configure is what is tested
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert says in out and "INTERNALERROR" not in out and "Traceback" not in out, out


def test_ray_gpus_marker_with_a_bad_count_is_named(pytester):
    pytest.importorskip("ray")
    pytester.makepyfile("import pytest\n@pytest.mark.ray_gpus('x')\ndef test_x(ray_cluster):\n    pass\n")
    result = pytester.runpytest("-p", "no:randomly", "--miles-ray-address=127.0.0.1:1")
    result.stdout.fnmatch_lines(["*@pytest.mark.ray_gpus(n): 'x' is not accepted; expected an integer >= 1*"])


def test_ray_address_of_a_live_port_that_is_not_ray_fails_within_the_timeout(pytester):
    pytest.importorskip("ray")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []
    stop = threading.Event()

    def accept():  # accepts and never answers: what made ray.init() wait without bound
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        pytester.makepyfile("def test_x(ray_cluster):\n    pass\n")
        t0 = time.monotonic()
        result = pytester.runpytest_subprocess("-p", "no:randomly",
                                               f"--miles-ray-address=127.0.0.1:{srv.getsockname()[1]}",
                                               "--miles-ray-timeout=8", timeout=90)
        took = time.monotonic() - t0
    finally:
        stop.set()
        srv.close()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--miles-ray-address*no Ray cluster answered within 8 s (--miles-ray-timeout)*"])
    assert took < 60


def test_a_wedged_engine_is_replaced_and_requests_are_bounded(tmp_path, tiny_model_dir):
    """SIGSTOP an engine: a request fails after --miles-engine-request-timeout (not 300 s), and the
    factory replaces the engine with a note instead of handing it to the next test."""
    import signal as sig

    from pytest_miles.engines.base import EngineError
    from pytest_miles.engines.factory import EngineFactory

    factory = EngineFactory(model_dir=lambda: str(tiny_model_dir), log_dir=tmp_path, hardware=lambda: None,
                            device="cpu", request_timeout=2.0)
    try:
        eng = factory("reference-server")
        os.kill(eng.proc.pid, sig.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="did not answer during /generate"):
            eng.generate([[1, 2, 3]])
        assert time.monotonic() - t0 < 10
        with pytest.warns(UserWarning, match="did not answer its health check within 2 s; it was killed and replaced"):
            fresh = factory("reference-server")
        assert fresh is not eng and factory.launches == 2 and not eng.alive
        assert fresh.generate([[1, 2, 3]])
    finally:
        factory.close()


def _not_deep(info: pytest.ExceptionInfo) -> None:
    """The error is raised at the edge (pytest_miles), not by a library deep below."""
    tb = info.traceback[-1]
    assert "pytest_miles" in str(tb.path), f"raised from {tb.path}:{tb.lineno}, not at the edge"


def test_the_table_has_at_least_150_cases():
    n = (len(BAD_SETTINGS) + len(BOOL_SETTINGS)) * 3 - len(BOOL_SETTINGS) + 6 + len(CONFIG_FILES) + 1 + len(TRAINER) + \
        len(TRAIN) + len(ENGINE) + len(HELPER_IDS) + len(ENGINE_CHECKS) + len(RECORD_NAMES) + \
        2 * len(SNAPSHOT_FILES) + len(VALUES) + 1 + len(CLI) + 1 + len(WIRING) + 3
    print(f"bad-input cases: {n}")
    assert n >= 150



