"""The determinism_snapshot fixture's object: record or compare exact digests per test and configuration."""

from __future__ import annotations

import pytest

from pytest_miles.plugin.state import state as _state


class DeterminismSnapshot:
    """`check(name, value)`: record (first run, or with --miles-snapshot-update) or compare the
    exact digest of `value` for this test and this machine's configuration."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        from pytest_miles.report.collector import KEY
        from pytest_miles.snapshots.store import SnapshotStore, configuration

        st = _state(request.config)
        root = request.config.rootpath / st.setting("snapshot_dir")
        self.store = SnapshotStore(root, st.setting("snapshot_update"), st.setting("snapshot_regen_all"))
        self.module, _, self.test = request.node.nodeid.partition("::")
        if self.module.startswith(("..", "/")):  # a test outside the rootdir (--pyargs of an installed package)
            self.module = request.module.__name__.replace(".", "/") + ".py"
        self.conf = configuration(st.fingerprint.to_json(), {"attention_backend": st.setting("attention_backend")})
        self.node, self.key, self.seen = request.node, KEY, set()
        self.other_config = st.setting("snapshot_other_config")

    def recorded(self, name: str) -> bool:
        """Whether any configuration holds a record `name` for this test (to skip, not fail, when none)."""
        data = self.store.read(self.store.path_for(self.module))
        rid = f"{self.test}::{name}"
        return any(rid in c.get("records", {}) for c in data["configurations"].values())

    @property
    def updating(self) -> bool:
        return self.store.update or self.store.regen_all

    def check(self, name: str, value):
        from pytest_miles.snapshots.store import SnapshotError
        from pytest_miles.validation import check_record_name

        check_record_name(name)
        if name in self.seen:
            raise SnapshotError(f"record {name!r} written twice by {self.node.nodeid} "
                                f"(file {self.store.path_for(self.module)}): give each record its own name")
        self.seen.add(name)
        rid = f"{self.test}::{name}"
        outcome = self.store.check(self.module, rid, value, self.conf)
        figures = {"result": outcome.status}
        if outcome.status == "passed (other configuration)":
            figures["note"] = outcome.message
        own = {"failed": "failed", "missing": "failed",
               "different configuration": "failed" if self.other_config == "fail" else "skipped"}.get(outcome.status,
                                                                                                   "passed")
        self.node.user_properties.append((self.key, {"check": f"snapshot {rid}", "figures": figures, "outcome": own,
                                                     "reason": outcome.message if own != "passed" else ""}))
        self.node.user_properties.append(("miles_snapshot", (str(self.store.path_for(self.module)), rid)))
        if outcome.status in ("failed", "missing"):
            raise AssertionError(outcome.message)
        if outcome.status == "different configuration":  # the test's other checks still run; see Deferred
            command = record_command(self.node)
            deferred = self.node.stash.setdefault(SNAPSHOT_DEFERRED,
                                                  DeferredSnapshots(self.other_config, command))
            deferred.messages.append(outcome.message)
            deferred.names.append(name)
        return outcome


class DeferredSnapshots:
    """Snapshot checks whose record exists only for another configuration and differs: the test
    runs all its checks, then skips (or, with --miles-snapshot-other-config=fail, fails) once,
    naming each."""

    def __init__(self, mode: str, command: str = "") -> None:
        self.mode, self.messages, self.names, self.command = mode, [], [], command

    def raise_outcome(self) -> None:
        text = (f"snapshot {', '.join(self.names)}: only another configuration has a record, and this run's value "
                "differs from it:\n" + "\n".join(self.messages))
        if self.mode == "fail":
            raise AssertionError(text + "\n(--miles-snapshot-other-config=fail)")
        how = (f"\nTo record this machine's own configuration beside it (then commit the file): "
               f"{self.command or 'pytest --miles-snapshot-update'}\n"
               "(--miles-snapshot-other-config=fail fails instead)")
        raise pytest.skip.Exception(text + how, _use_item_location=True)


def record_command(node: pytest.Item) -> str:
    """The one command that records this test's snapshots for this machine's configuration."""
    module = getattr(getattr(node, "module", None), "__name__", "")
    if module.startswith("pytest_miles.suite."):
        return f"pytest-miles suite --miles-snapshot-update -k {node.name.split('[')[0]}"
    return f"pytest --miles-snapshot-update '{node.nodeid}'"


SNAPSHOT_DEFERRED = pytest.StashKey[DeferredSnapshots]()


def raise_deferred(item: pytest.Item) -> None:
    """Snapshot checks that skipped ran all; the test skips (or fails) now, naming each."""
    deferred = item.stash.get(SNAPSHOT_DEFERRED, None)
    if deferred:
        deferred.raise_outcome()
