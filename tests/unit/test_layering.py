# mypy: allow-untyped-defs
"""Dependencies point one way (STYLE.md A.3): checked by parsing every module with ``ast``.

- ``hotstate.actors`` imports neither ``runtime`` nor ``persistence``, and no I/O library;
- ``hotstate.persistence`` does not import ``runtime``;
- only ``hotstate/__init__.py`` imports from all three subpackages;
- ``_errors.py`` and ``_clock.py`` are leaves;
- ``hotstate._cli`` is the application on top of the three layers and
  ``hotstate._bench`` the library it calls: both may import the layers,
  ``hotstate._bench`` never imports ``hotstate._cli``, and nothing else in
  hotstate imports either.

Every import counts, including those under ``if TYPE_CHECKING:``: a layer that
needs another layer's names for typing still depends on it. Importing the root
package ``hotstate`` from a subpackage counts as importing every layer, because
``hotstate/__init__.py`` imports them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hotstate

PACKAGE_DIR = Path(hotstate.__file__).parent
SUBPACKAGES = ("actors", "runtime", "persistence")
APPLICATIONS = ("_cli", "_bench")
IO_LIBRARIES = ("valkey", "aiosqlite", "sqlite3")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool) -> set[str]:
    """Return the absolute names of every module ``source`` imports (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from hotstate import runtime` imports the subpackage hotstate.runtime
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def layers_of(imports: set[str]) -> set[str]:
    """Which hotstate subpackages the imports reach (the root package reaches all)."""
    reached: set[str] = set()
    for name in imports:
        parts = name.split(".")
        if parts[0] != "hotstate":
            continue
        if len(parts) == 1:
            reached.update(SUBPACKAGES)  # hotstate/__init__.py imports every layer
        elif parts[1] in SUBPACKAGES:
            reached.add(parts[1])
    return reached


def violations(path: Path, source: str) -> list[str]:
    module = module_name(path)
    imports = imported_modules(source, module, is_package=path.name == "__init__.py")
    reached = layers_of(imports)
    parts = module.split(".")
    own = parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else None
    problems: list[str] = []
    if len(parts) > 1 and parts[1] in APPLICATIONS:
        if parts[1] == "_bench":
            problems += [
                f"{module} imports {name}: the bench library never imports the application hotstate._cli"
                for name in sorted(imports)
                if name.split(".")[:2] == ["hotstate", "_cli"]
            ]
        return problems
    if module != "hotstate.__main__":
        problems += [
            f"{module} imports the application {name}"
            for name in sorted(imports)
            if name.split(".")[:2] in (["hotstate", app] for app in APPLICATIONS)
        ]
    if own == "actors":
        problems += [f"{module} imports hotstate.{layer}" for layer in sorted(reached - {"actors"})]
        problems += [
            f"{module} imports I/O library {name}" for name in sorted(imports) if name.split(".")[0] in IO_LIBRARIES
        ]
    if own == "persistence" and "runtime" in reached:
        problems.append(f"{module} imports hotstate.runtime")
    # A module's own layer does not count: runtime may import actors and persistence.
    if module != "hotstate" and set(SUBPACKAGES) <= reached - {own}:
        problems.append(f"{module} imports from all three subpackages; only hotstate/__init__.py may")
    if module in ("hotstate._errors", "hotstate._clock"):
        problems += [
            f"{module} is a leaf but imports {name}" for name in sorted(imports) if name.split(".")[0] == "hotstate"
        ]
    return problems


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_has_modules_in_every_existing_layer():
    names = {module_name(p) for p in all_modules()}
    assert {
        "hotstate",
        "hotstate._errors",
        "hotstate.actors",
        "hotstate.runtime",
    } <= names
    assert any(n.startswith("hotstate.actors._") for n in names)
    assert any(n.startswith("hotstate.runtime._") for n in names)


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: module_name(p))
def test_module_imports_respect_the_layers(path):
    assert violations(path, path.read_text(encoding="utf-8")) == []


# The checker itself must be able to fail: feed it forbidden imports.

ACTORS_MODULE = PACKAGE_DIR / "actors" / "_example.py"
PERSISTENCE_MODULE = PACKAGE_DIR / "persistence" / "_example.py"
RUNTIME_MODULE = PACKAGE_DIR / "runtime" / "_example.py"
BENCH_MODULE = PACKAGE_DIR / "_bench" / "_example.py"
CLI_MODULE = PACKAGE_DIR / "_cli" / "_example.py"


@pytest.mark.parametrize(
    ("path", "source", "needle"),
    [
        (ACTORS_MODULE, "from hotstate.runtime import Runtime", "hotstate.runtime"),
        (ACTORS_MODULE, "import hotstate.persistence._store", "hotstate.persistence"),
        (
            ACTORS_MODULE,
            "from ..runtime._backoff import backoff_delay",
            "hotstate.runtime",
        ),
        (ACTORS_MODULE, "from .. import persistence", "hotstate.persistence"),
        (ACTORS_MODULE, "from hotstate import Runtime", "hotstate.runtime"),
        (ACTORS_MODULE, "import sqlite3", "sqlite3"),
        (ACTORS_MODULE, "import aiosqlite", "aiosqlite"),
        (ACTORS_MODULE, "from valkey.asyncio import Valkey", "valkey"),
        (
            ACTORS_MODULE,
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hotstate.runtime import Runtime\n",
            "hotstate.runtime",
        ),
        (
            PERSISTENCE_MODULE,
            "from hotstate.runtime._events import EventBus",
            "hotstate.runtime",
        ),
        (PERSISTENCE_MODULE, "from ..runtime import Runtime", "hotstate.runtime"),
        (
            PACKAGE_DIR / "testing.py",
            "from hotstate import actors, persistence, runtime",
            "all three",
        ),
        (
            PACKAGE_DIR / "_example.py",
            "import hotstate.actors\nimport hotstate.runtime._runtime\nfrom .persistence import Store",
            "all three",
        ),
        (PACKAGE_DIR / "_errors.py", "from hotstate.actors import Status", "leaf"),
        (BENCH_MODULE, "from hotstate._cli._output import fail", "hotstate._cli"),
        (BENCH_MODULE, "from .._cli import main", "hotstate._cli"),
        (BENCH_MODULE, "from hotstate import _cli", "hotstate._cli"),
        (RUNTIME_MODULE, "from hotstate._bench import run_bench", "application"),
        (PERSISTENCE_MODULE, "from hotstate._cli import main", "application"),
    ],
)
def test_the_layering_checker_catches_forbidden_imports(path, source, needle):
    found = violations(path, source)
    assert found
    assert any(needle in problem for problem in found)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        (
            ACTORS_MODULE,
            "from hotstate._errors import ConfigError\nfrom hotstate.actors._snapshot import Status\nimport asyncio",
        ),
        (ACTORS_MODULE, "from ._snapshot import Status\nfrom . import _workflow"),
        (
            PERSISTENCE_MODULE,
            "import sqlite3\nimport aiosqlite\nfrom hotstate.actors import Snapshot",
        ),
        (
            RUNTIME_MODULE,
            "from hotstate.actors import Snapshot\nfrom hotstate.persistence import Store",
        ),
        (
            PACKAGE_DIR / "__init__.py",
            "from hotstate import actors, persistence, runtime",
        ),
        (CLI_MODULE, "from hotstate._bench import run_bench\nfrom hotstate.runtime import Runtime"),
        (BENCH_MODULE, "from hotstate._bench._table import render_table\nfrom hotstate import Runtime"),
        (PACKAGE_DIR / "__main__.py", "from hotstate._cli import main"),
    ],
)
def test_the_layering_checker_allows_imports_that_point_the_right_way(path, source):
    assert violations(path, source) == []
