"""The bundled determinism suite: `pytest-miles suite` / `pytest --pyargs pytest_miles.suite`.

Each module checks one stack; parts skip with a reason when their component is missing.
"""
