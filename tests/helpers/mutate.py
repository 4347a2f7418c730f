"""Seeded structural damage to JSON-shaped data (the reports, records and snapshots users hand us): fields removed,
added, or replaced by a value of another type, for tests that every such input is answered or named."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**70, -(2**70), 1.5, -0.0, float("nan"), float("inf"), float("-inf"), "", "x",
    "../../etc", "\x00", "1e999", [], {}, [1, 2], {"a": 1}, [[]], [None], {"": None},
)


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def mutate(value: Any, rng: random.Random) -> Any:
    """A damaged deep copy of `value`: 1 to 3 places (the whole value included) removed, replaced by an odd value,
    or given an unknown field."""
    value = copy.deepcopy(value)
    places = list(_paths(value))
    for _ in range(rng.choice((1, 1, 2, 3))):
        path = rng.choice(places)
        if not path:
            return rng.choice(ODD_VALUES)
        parent = value
        try:
            for k in path[:-1]:
                parent = parent[k]
            if isinstance(parent, dict) != isinstance(path[-1], str):  # the way there was replaced on the way
                continue
            how = rng.random()
            if how < 0.2 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif how < 0.3 and isinstance(parent, dict):
                parent[f"unknown{rng.randrange(9)}"] = rng.choice(ODD_VALUES)
            else:
                parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        except (KeyError, IndexError, TypeError):  # an earlier change removed or replaced the way there
            pass
    return value
