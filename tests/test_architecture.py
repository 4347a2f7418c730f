"""The house rules, checked: floors only point down (import-linter's contract in pyproject.toml),
no import circles (function-level imports counted), small modules and functions, user-facing words."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pytest_miles"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every pytest_miles module `name` imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("pytest_miles.") and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    modules = _modules()
    # a package's __init__ re-exporting its children is not a circle with them
    graph = {n: {m for m in _imports(n, p, modules) if not (p.name == "__init__.py" and m.startswith(n + "."))}
             for n, p in modules.items()}
    assert not _cycles(graph), f"import circles (function-level imports count): {_cycles(graph)}"


def test_the_circle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None,
                    reason="import-linter is not installed (pip install -e '.[dev]')")
def test_floors_only_point_down():
    # import-linter run by this interpreter: a `lint-imports` on PATH may be another Python's (or a
    # pyenv shim that needs bash on PATH).
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_modules_and_functions_stay_small():
    big, long = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not big and not long, f"over {MAX_MODULE_LINES} lines: {big}; functions over {MAX_FUNCTION_LINES}: {long}"


# What `nox -s lint` runs ruff on (noxfile.py); every Python file there keeps pyproject's line length.
LINTED = ("pytest_miles", "tests", "benchmarks", "scripts", "examples", "noxfile.py", "conftest.py", "setup.py")
PRAGMA = re.compile(r"\s*# (noqa|type:|pragma)\b.*$")  # ruff's E501 does not count a trailing pragma comment


def test_lines_stay_within_the_configured_length():
    """ruff's E501 at [tool.ruff] line-length, checked here too so CI fails on a long line
    even where ruff is not installed; `nox -s lint` runs ruff on the same paths."""
    limit = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"]
    nox_lint = (ROOT / "noxfile.py").read_text().split("def lint(", 1)[1].split("\n@", 1)[0]
    assert all(f'"{p}"' in nox_lint for p in LINTED), f"nox -s lint must run ruff on all of {LINTED}"
    files = [p for name in LINTED for p in ([ROOT / name] if name.endswith(".py") else (ROOT / name).rglob("*.py"))]
    long = [f"{path.relative_to(ROOT)}:{number}: {len(line)} columns"
            for path in files for number, line in enumerate(path.read_text().splitlines(), 1)
            if len(PRAGMA.sub("", line)) > limit]
    assert not long, f"lines over {limit} columns (pyproject [tool.ruff] line-length):\n" + "\n".join(long)


# Words that mean something only inside this project's history; paths outside the package (the
# package must not send a user to a file they do not have).
INTERNAL = re.compile(r"\bseed'?s? ?0\d\d\b|\bseeds? 0\d\d/|\bissue #?\d+|\bthe seed'?s\b", re.IGNORECASE)
OUTSIDE = re.compile(r"\.\./shared|gpu-host\.sh|build-te\.sh|gpu-validate\.sh")


def test_no_internal_vocabulary_for_users():
    hits = []
    for path in [*PKG.rglob("*.py"), *PKG.rglob("*.toml"), ROOT / "README.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if INTERNAL.search(line) or (path.suffix != ".md" and OUTSIDE.search(line)):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "internal words or outside paths in user-facing text:\n" + "\n".join(hits)


def test_one_exception_family():
    """Every exception class the package defines derives from pytest_miles.errors.MilesError."""
    import pytest_miles.errors as errors

    stray = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                if name != "pytest_miles.errors":
                    stray.append(f"{name}.{node.name}")
    assert not stray, f"exception classes outside pytest_miles/errors.py: {stray}"
    assert all(issubclass(c, errors.MilesError) for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == errors.__name__)


def test_the_bundled_suite_uses_only_the_public_api():
    """What the suite does, a user can do: it imports `from pytest_miles import ...` (and its own
    conftest), never a room of the package."""
    import pytest_miles

    deep = []
    for path in (PKG / "suite").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_miles."):
                if node.module != "pytest_miles.suite.conftest" and node.module != "pytest_miles.errors":
                    deep.append(f"{path.name}: from {node.module} import ...")
            if isinstance(node, ast.ImportFrom) and node.module == "pytest_miles":
                deep += [f"{path.name}: {a.name} is not exported" for a in node.names
                         if a.name not in pytest_miles.__all__]
    assert not deep, deep


def test_tests_mirror_the_rooms():
    """A test lives in the folder of the room it tests (tests/<room>/), so a room's tests are found
    where its code is; the house rules, packaging and README tests sit at the top."""
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.name for p in (ROOT / "tests").iterdir()
               if p.is_dir() and p.name not in ("gpu", "helpers", "__pycache__")}
    assert folders <= rooms, f"test folders that are not rooms of the package: {sorted(folders - rooms)}"
    top = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert top == ["test_architecture.py", "test_atomic_write.py", "test_install.py", "test_install_size.py",
                   "test_readme_examples.py"], top
