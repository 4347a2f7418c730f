"""The public helpers' arguments, given a value of another type or out of range: one error naming the argument
and what is accepted (InputError, a ValueError), never a TypeError from a comparison deep inside, and never an
attempt to allocate what no machine has."""

from __future__ import annotations

import pytest

from pytest_miles import SamplingParams, coverage_cases, precision_matrix
from pytest_miles.errors import InputError

ODD = [None, True, "", "x", [], {}, b"x", object(), float("nan"), float("inf")]


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "top_k", "max_new_tokens", "sampling_seed",
                                   "ignore_eos"])
def test_sampling_params_name_the_field(field):
    for value in ODD:
        if (field, value) in (("sampling_seed", None),) or (field == "ignore_eos" and value is True):
            continue  # what the field accepts
        with pytest.raises(InputError, match=f"SamplingParams.{field}: ") as exc:
            SamplingParams(**{field: value})
        assert "not supported between" not in str(exc.value)
    out_of_range = {"top_k": (0, "expected -1 (off) or an integer >= 1"),
                    "max_new_tokens": (2**31, "not in [1, 2**31 - 1]"),
                    "sampling_seed": (2**64, "is not a 64-bit integer"), "temperature": (-0.5, "< 0")}
    if field in out_of_range:
        value, says = out_of_range[field]
        with pytest.raises(InputError) as exc:
            SamplingParams(**{field: value})
        assert str(exc.value).startswith(f"SamplingParams.{field}: ") and says in str(exc.value), str(exc.value)
    assert SamplingParams(temperature=0, top_k=40, sampling_seed=-5).top_k == 40  # ints where floats go; any seed


def test_coverage_cases_bounds_its_n_squared_batches():
    with pytest.raises(InputError, match=r"n: expected the number of prompts, an integer in \[1, 4096\]"):
        coverage_cases(2**70)  # before: a MemoryError after filling the machine's memory
    for bad in (True, 1.5, "3", 0):
        with pytest.raises(InputError, match="n: expected"):
            coverage_cases(bad)
    with pytest.raises(InputError, match=r"window: expected an integer in \[2, 4096\]"):
        coverage_cases(4, window=True)
    assert len(coverage_cases(3)["ordered_pairs"]) == 6


def test_precision_matrix_gpu_must_be_a_name():
    for bad in (0, 1.5, [], b"h100"):
        with pytest.raises(ValueError, match="GPU class override .*expected a string naming a class or model"):
            precision_matrix(gpu=bad)
    assert precision_matrix(gpu="h100")


def test_parity_helpers_name_what_they_were_given():
    from pytest_miles import ParityRecord, assert_parity, compare_parity

    rec = ParityRecord([1], [2], [-0.5], [-0.5])
    with pytest.raises(InputError, match=r"compare_parity\(records=ParityRecord.*expected a list of ParityRecord"):
        compare_parity(rec)  # one record, not a list of them
    report = compare_parity([rec], {"model": "tiny"})
    with pytest.raises(InputError, match=r"expected a ParityReport .*got dict \(a to_json\(\) dict is not read back"):
        assert_parity(report.to_json(), "exact")
    assert_parity(report, "exact")


def test_deterministic_env_vars_extra_is_a_dict_of_strings():
    from pytest_miles import deterministic_env_vars

    for bad in ("NCCL_ALGO=Ring", [("A", "1")], {"A": 1}):
        with pytest.raises(InputError, match="expected a dict of variable name -> string value"):
            deterministic_env_vars(extra=bad)
    assert deterministic_env_vars(extra={"A": "1"})["A"] == "1"


def test_sampling_params_take_numpy_scalars_as_plain_numbers():
    """An RL loop's seeds often come from numpy: taken, and sent to SGLang as JSON numbers."""
    import json

    np = pytest.importorskip("numpy")
    p = SamplingParams(temperature=np.float64(0.5), sampling_seed=np.int64(7), max_new_tokens=np.int32(3))
    assert json.loads(json.dumps(p.to_sglang())) == {"temperature": 0.5, "top_p": 1.0, "top_k": -1,
                                                     "max_new_tokens": 3, "sampling_seed": 7, "min_p": 0.0,
                                                     "ignore_eos": False}
    assert type(p.sampling_seed) is int and type(p.temperature) is float
