"""Every exception pytest-miles raises, in one family under `MilesError`.

A plain script can `except MilesError`; the plugin turns `NotApplicable` into a skip (and
`Unavailable` into a failure under --miles-require-gpu) in one place, and `KnownLimitation` into an
XFAIL naming its reference. Each class keeps the builtin base its callers already catch.
"""

from __future__ import annotations

from typing import Any

try:  # pickle.UnpicklingError is _pickle's (the C accelerator's): ~2 ms of start-up less than `import pickle`
    from _pickle import UnpicklingError
except ImportError:  # pragma: no cover  (a Python without the accelerator)
    from pickle import UnpicklingError


class MilesError(Exception):
    """Base of every pytest-miles exception."""


# ---- bad input: named with where it came from and what is accepted ---------------------------


class InputError(MilesError, ValueError):
    """A value, file or argument a user handed us that cannot be used; the message names it."""


class CapabilityError(InputError):
    """A capability file that cannot be used; the message names the file and the field."""


class BudgetError(InputError):
    """A parity budget file that cannot be used; the message names the file, the budget and the field."""


class EnvInputError(InputError):
    """A runtime_env file or env-vars JSON that cannot be used; the message names it."""


class ConvertError(InputError):
    """A state dict or config that does not fit the converter's mapping; the message names the key."""


class CheckpointError(MilesError):
    """An unusable checkpoint or file (the CLI exits 2): names the file and what is wrong with it."""


class UnsafePickle(MilesError, UnpicklingError):
    """The pickle names a callable we will not call."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class UnknownClass(UnsafePickle):
    """The pickle holds an object of a class outside the documented allow-list: nothing is called,
    but a stand-in would compare only what the file says, so the file is refused by name."""


class SnapshotError(MilesError):
    """Unusable snapshot data (corrupt or hand-edited file, unwritable dir, duplicate record)."""


# ---- the parts we start ----------------------------------------------------------------------


class EngineError(MilesError, RuntimeError):
    """An engine could not start, died, or answered nonsense. Carries the log tail when there is one."""


class WeightNotServed(EngineError):
    """The engine answered SGLang's "Get parameter by name failed" for a weight name (no such
    parameter, or a model class without get_weights_by_name)."""


class TrainerError(MilesError, RuntimeError):
    """A trainer could not run: bad configuration, unwritable dir, or a rank that crashed."""


class ClusterError(MilesError, RuntimeError):
    """The Ray cluster could not be reached or started, or a worker on it failed."""


class LeaseError(MilesError, RuntimeError):
    """Not enough GPUs became free in time, or more were asked for than the machine has."""


# ---- verdicts that are not a pass ------------------------------------------------------------


class NotApplicable(MilesError):  # noqa: N818  (named for what it reports, like pytest's Skipped)
    """The check cannot test anything here (e.g. no prefix cache): not a pass. A skip in pytest."""


class Inconclusive(NotApplicable):  # noqa: N818
    """A timing figure whose spread covers its claim (noise, said as noise): not a pass. A skip in
    pytest, "inconclusive" in the determinism report."""


class Unbudgeted(NotApplicable):  # noqa: N818
    """A parity figure measured for a configuration that has no budget: reported "unbudgeted",
    never passed (a skip in pytest)."""


class Unavailable(NotApplicable):
    """A part this machine lacks (a GPU, its generation, a package): a skip in pytest, a failure
    under --miles-require-gpu, where a silent skip would hide a broken driver."""


class TransformerEngineUnavailable(TrainerError, Unavailable):
    """transformer_engine is not importable here: the TE path is not applicable."""


class PrecisionUnsupported(TrainerError, NotApplicable):
    """The precision rules say this machine's GPU cannot train in this precision."""


class CellNotRunnable(NotApplicable):
    """This machine cannot run the precision cell (GPU generation, or a part not wired here)."""


class KnownLimitation(MilesError):  # noqa: N818
    """A failure that the capability data records as a known upstream limitation (XFAIL in pytest)."""

    def __init__(self, report: Any, capability: Any) -> None:
        self.report, self.capability = report, capability
        super().__init__(f"known limitation: {capability.describe()}\n{report.render()}")

    @property
    def references(self) -> tuple[str, ...]:
        return self.capability.cell.references if self.capability.cell else ()


class CheckFailed(MilesError, AssertionError):
    """A determinism check failed; the message is the whole report."""


class UnexpectedPass(CheckFailed):
    """A known limitation did not reproduce under the shape that reproduces it: update the data."""
