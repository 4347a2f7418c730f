"""Seeded structural damage to JSON-shaped data (the reports, records and snapshots users hand us): fields removed,
added, or replaced by a value of another type, for tests that every such input is answered or named."""

from __future__ import annotations

import copy
import json
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


def _toml_value(value: Any) -> str | None:
    if value is None:  # TOML has no null: the key is left out
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else "inf" if value == float("inf") else "-inf" if value == -float("inf") \
            else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(v for v in map(_toml_value, value) if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {v}" for k, v in
                               ((k, _toml_value(v)) for k, v in value.items()) if v is not None) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(data: dict[str, Any]) -> str:
    """`data` as TOML text (tables inline; a None is left out, as TOML has none), for damaged data files."""
    return "".join(f"{_toml_value(str(k))} = {v}\n" for k, v in ((k, _toml_value(v)) for k, v in data.items())
                   if v is not None)
