"""Fixtures for Ray clusters and GPU leases. Ray is imported only when a test asks for a cluster."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from pytest_miles._xdist import is_worker
from pytest_miles.errors import Unavailable
from pytest_miles.plugin.state import state as _state


def lease_root(st) -> Path:
    """The lock folder every pytest process of this machine shares (xdist workers and separate
    sessions alike): --miles-gpu-lease-dir, default <tmp>/pytest-miles-leases-<uid>."""
    return Path(st.setting("gpu_lease_dir") or Path(tempfile.gettempdir()) / f"pytest-miles-leases-{os.getuid()}")


def _new_leaser(st, tmp_path_factory: pytest.TempPathFactory):
    from pytest_miles.placement.leases import GpuLeaser, visible_tokens

    return GpuLeaser(lease_root(st), visible_tokens(len(st.hardware.nvidia)),
                     timeout=st.setting("gpu_lease_timeout"))


@pytest.fixture(scope="session")
def miles_gpu_leaser(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """The session's GpuLeaser, or None when leasing is off (`--miles-gpu-lease`, default: on under
    pytest-xdist) or the machine has no NVIDIA GPU."""
    st = _state(pytestconfig)
    mode = st.setting("gpu_lease")
    if mode == "off" or (mode == "auto" and not is_worker()) or not st.hardware.nvidia:
        return None
    return _new_leaser(st, tmp_path_factory)


@pytest.fixture
def miles_gpu_lease(request: pytest.FixtureRequest, pytestconfig: pytest.Config, tmp_path_factory):
    """`miles_gpu_lease(n=1)` -> Lease of n GPUs no other xdist worker holds, for this test; its
    `.env` is the CUDA_VISIBLE_DEVICES to give what the test starts. Works with leasing off too
    (then a lease only guards this process's own tests)."""
    leaser = request.getfixturevalue("miles_gpu_leaser") or _new_leaser(_state(pytestconfig), tmp_path_factory)
    held = []

    def lease(n: int = 1):
        from pytest_miles.validation import integer

        integer("miles_gpu_lease(n)", n, minimum=0, maximum=1024)
        st = _state(pytestconfig)
        if n >= 1 and not st.hardware.nvidia:  # leases are tokens: pretended GPUs (--miles-gpu-class) lease too
            raise Unavailable(f"miles_gpu_lease({n}) requires an NVIDIA GPU; found {st.hardware.describe()}")
        got = leaser.acquire(n, owner=request.node.nodeid)
        held.append(got)
        return got

    yield lease
    for got in held:
        got.release()


@pytest.fixture(scope="session")
def miles_ray_session(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """The session's RayCluster: `--miles-ray-address` / RAY_ADDRESS, else a local head it owns."""
    st = _state(pytestconfig)
    if importlib.util.find_spec("ray") is None:
        raise Unavailable("requires Ray (pip install 'pytest-miles[ray]'); it is not installed")
    from pytest_miles.placement.ray_cluster import ClusterError, RayCluster

    address, source = st.setting("ray_address"), "--miles-ray-address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    timeout = st.setting("ray_timeout")
    try:
        if address:
            cluster = RayCluster.connect(address, timeout=timeout, source=source)
        else:
            cluster = RayCluster.start_local(tmp_path_factory.getbasetemp(), timeout=timeout)
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.shutdown()


class ClusterView:
    """The session's cluster as one test sees it: nodes the test adds are removed when it ends
    (a second "machine" must not leak into later tests); everything else is the session's."""

    def __init__(self, session) -> None:
        self._session, self._added = session, []

    def add_node(self, **kwargs):
        node = self._session.add_node(**kwargs)
        self._added.append(node)
        return node

    def remove_added_nodes(self) -> None:
        while self._added:
            self._session.remove_node(self._added.pop())

    def __getattr__(self, name: str):
        return getattr(self._session, name)


@pytest.fixture
def ray_cluster(request: pytest.FixtureRequest):
    """The Ray cluster (`.nodes()`, `.gpus()`, `.add_node()` on a local head, `.require(gpus=n)`).
    A test marked `ray_gpus(n)` is skipped, with the reason, when the cluster has fewer GPUs.
    Nodes the test adds with `.add_node()` are removed at its end."""
    mark = request.node.get_closest_marker("ray_gpus")
    n = None
    if mark is not None:  # checked before the cluster starts: a bad marker is named, not a cluster error
        from pytest_miles.validation import check_gpu_count_marker

        try:
            n = check_gpu_count_marker(mark)
        except ValueError as exc:
            pytest.fail(f"{request.node.nodeid}: {exc}", pytrace=False)
    session = request.getfixturevalue("miles_ray_session")
    if n is not None:
        session.require(gpus=n)
    view = ClusterView(session)
    yield view
    view.remove_added_nodes()
