"""Parity budget files are validated like the capability file (file, budget and field named);
budgets derived from N runs; the packaged file loads."""

from __future__ import annotations

import pytest

from pytest_miles.capabilities.parity_budgets import (
    PACKAGED,
    BudgetError,
    derive_budget,
    find_budget,
    read_budgets,
)
from pytest_miles.errors import InputError

GOOD = """[[budget]]
model = "tiny128"
rollout = "bf16"
train = "bf16"
backend = "flashinfer"
tp = 1
kind = "tolerance"
mean_abs = 0.03
calibration = {runs = 5, statistic = "max x 1.5", host = "H200", date = "2026-12-04", versions = {sglang = "0.5.17"}}
"""


def test_packaged_file_loads():
    budgets = read_budgets(PACKAGED)
    assert all(b.source == str(PACKAGED) for b in budgets)


def test_good_file(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text(GOOD)
    (b,) = read_budgets(f)
    assert b.key == ("tiny128", "bf16", "bf16", "flashinfer", 1) and b.mean_abs == 0.03
    assert "calibrated from 5 runs (max x 1.5) on H200, 2026-12-04" in b.describe()
    assert find_budget(b.key, user=f) == b and find_budget(("x", "bf16", "bf16", "flashinfer", 1), user=f) is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('kind = "tolerance"', 'kind = "close"'), "field 'kind': 'close' is not one of exact"),
        (lambda t: t.replace("tp = 1", "tp = 0"), "field 'tp': expected an integer >= 1"),
        (lambda t: t.replace("mean_abs = 0.03", "mean_abs = -1"), "field 'mean_abs': expected a finite number >= 0"),
        (lambda t: t.replace("mean_abs = 0.03\n", ""), "field 'mean_abs' is missing"),
        (lambda t: t.replace("runs = 5", "runs = 1"), "field 'calibration'.runs: expected an integer >= 2"),
        (lambda t: t.replace('host = "H200", ', ""), "field 'calibration': field 'host' is missing"),
        (lambda t: t.split("calibration")[0], "field 'calibration' is missing"),
        (lambda t: t + "colour = 1\n", "unknown field.s. colour"),
        (lambda t: t.replace('backend = "flashinfer"\n', ""), "field 'backend' is missing"),
        (lambda t: t + t, "has two budgets"),
        (lambda t: t.replace('kind = "tolerance"', 'kind = "exact"'), "'exact' takes no mean_abs"),
        (lambda t: "[[budget]\n", "not valid TOML"),
    ],
)
def test_bad_file_names_file_budget_and_field(tmp_path, edit, message):
    f = tmp_path / "bad.toml"
    f.write_text(edit(GOOD))
    with pytest.raises(BudgetError, match=message) as exc:
        read_budgets(f)
    assert str(f) in str(exc.value) and isinstance(exc.value, InputError)
    if "budget" in message or "field" in message:
        assert "[[budget]] #" in str(exc.value) or "two budgets" in str(exc.value)


def _report(mean, equal, tokens=10, model="tiny"):
    return {
        "config": {"model": model, "rollout": "fp32", "train": "fp32", "backend": "torch", "tp": 1},
        "versions": {"torch": "2.13"},
        "identity_errors": [],
        "pairs": {
            "train_vs_decode": {
                "mean_abs": mean,
                "max_abs": 4 * mean,
                "k3_kl": mean / 10,
                "bitwise_equal": equal,
                "tokens": tokens,
            }
        },
    }


def test_derive_budget(tmp_path):
    text = derive_budget([_report(1e-6, 3), _report(2e-6, 1), _report(1.5e-6, 2)], host="cpu", date="2026-12-04")
    f = tmp_path / "derived.toml"
    f.write_text(text)
    (b,) = read_budgets(f)
    assert b.kind == "tolerance" and b.mean_abs == pytest.approx(3e-6) and b.max_abs == pytest.approx(1.2e-5)
    assert b.calibration["runs"] == 3 and b.calibration["versions"] == {"torch": "2.13"}
    exact = derive_budget([_report(0.0, 10), _report(0.0, 10)], host="cpu", date="2026-12-04")
    f.write_text(exact)
    assert read_budgets(f)[0].kind == "exact"
    with pytest.raises(InputError, match="at least 2 runs"):
        derive_budget([_report(1e-6, 3)], host="cpu", date="d")
    with pytest.raises(InputError, match="not of one configuration"):
        derive_budget([_report(1e-6, 3), _report(1e-6, 3, model="other")], host="cpu", date="d")


def test_cli_parity_budget(tmp_path, capsys):
    import json

    from pytest_miles.cli import main

    paths = []
    for i, mean in enumerate((1e-6, 2e-6)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(_report(mean, 3)))
    assert main(["parity-budget", *map(str, paths), "--host", "ci-cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[[budget]]") and 'host = "ci-cpu"' in out and "mean_abs = 3e-06" in out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["parity-budget", str(paths[0]), str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a parity report" in capsys.readouterr().err


def test_malformed_reports_are_named_never_a_stray_exception(tmp_path, capsys):
    """Seeded: a real report's fields (ParityReport.to_json()) removed, added, or replaced by values of every other
    type (None, booleans, huge integers, NaN, infinities, strings, lists, tables): `parity-budget` prints a budget
    that reads back as a budget file, or exits 2 with one line naming the report; never a Python exception."""
    import json
    import random

    from pytest_miles.checks.parity import ParityRecord, compare_parity
    from pytest_miles.cli import main
    from tests.helpers.mutate import mutate

    config = {"model": "tiny", "rollout": "fp32", "train": "fp32", "backend": "torch", "tp": 1}
    records = [ParityRecord([1, 2], [3, 4, 5], [-0.5, -1.25, -2.0], [-0.5, -1.2500001, -2.0], [-0.5, -1.25, -2.0])]
    report = compare_parity(records, config, {"torch": "2.13"}).to_json()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report))
    rng, outcomes = random.Random("parity-reports"), {0: 0, 2: 0}
    for k in range(400):
        bad = tmp_path / f"bad{k}.json"
        bad.write_text(json.dumps(mutate(report, rng)))
        rc = main(["parity-budget", str(good), str(bad), "--host", "ci"])
        out, err = capsys.readouterr()
        assert rc in (0, 2) and "Traceback" not in err and "--debug shows" not in err, (k, rc, err)
        if rc == 2:
            assert err.count("\n") == 1 and str(bad) in err, (k, err)
        else:
            (tmp_path / "out.toml").write_text(out)
            assert read_budgets(tmp_path / "out.toml")[0].key == ("tiny", "fp32", "fp32", "torch", 1), out
        outcomes[rc] += 1
    assert outcomes[0] and outcomes[2], outcomes  # both a damage read through and one refused
