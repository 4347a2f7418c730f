"""Run on the GPU host with `pytest -m hopper` and `pytest -m blackwell`: the sample tests that
show the markers select and skip as users expect on real hardware."""

import pytest


@pytest.mark.hopper
def test_sample_on_hopper(miles_hardware, miles_fingerprint):
    gpu = miles_hardware.nvidia[0]
    print(f"\nrunning on {gpu.name} ({gpu.sm}), {gpu.memory_gib} GiB; fingerprint {miles_fingerprint.digest}")
    assert gpu.capability == (9, 0)


@pytest.mark.blackwell
def test_sample_on_blackwell(miles_hardware):
    assert miles_hardware.nvidia[0].capability in ((10, 0), (10, 3))
