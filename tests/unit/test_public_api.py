# mypy: allow-untyped-defs
"""The public surface (STYLE.md A.1, C.10, E.15): ``__all__``, docstrings, ``py.typed``, errors."""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
from pathlib import Path

import pytest

import hotstate
import hotstate._errors

PUBLIC_MODULES = (
    "hotstate",
    "hotstate.actors",
    "hotstate.runtime",
    "hotstate.persistence",
    "hotstate.testing",
)
PACKAGE_DIR = Path(hotstate.__file__).parent


def _exports() -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        pairs.extend((name, export) for export in module.__all__)
    return pairs


@functools.cache
def _implementation_trees() -> list[tuple[str, ast.Module]]:
    """Every module that may define a public name (re-exporting ``__init__`` files excluded).

    Only parsed here; a module is imported only when it defines an exported name,
    so half-written modules elsewhere in the tree do not break this file.
    """
    out = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or "__pycache__" in path.parts:
            continue
        name = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError:  # a module being written right now; importing it fails elsewhere
            continue
        out.append((name, tree))
    return out


def _definition_has_docstring(tree: ast.Module, name: str) -> bool | None:
    """True/False if ``tree`` defines ``name`` at top level (with/without a docstring), else None."""
    body = tree.body
    for i, node in enumerate(body):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return bool(ast.get_docstring(node))
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            following = body[i + 1] if i + 1 < len(body) else None
            return (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
                and bool(following.value.value.strip())
            )
    return None


def test_every_public_module_declares_all():
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        assert isinstance(module.__all__, list | tuple), name
        assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ has duplicates"


@pytest.mark.parametrize(("module_name", "export"), _exports())
def test_every_exported_name_resolves(module_name, export):
    module = importlib.import_module(module_name)
    assert hasattr(module, export), f"{module_name}.{export} is in __all__ but does not resolve"


@pytest.mark.parametrize(("module_name", "export"), _exports())
def test_every_exported_name_has_a_docstring(module_name, export):
    obj = getattr(importlib.import_module(module_name), export)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        # Own docstring, not an inherited or generated one (dataclass and NamedTuple
        # make one up from the signature), so read the source definition.
        assert inspect.getdoc(obj), f"{module_name}.{export} has no docstring"
    found = [
        has_doc
        for name, tree in _implementation_trees()
        if (has_doc := _definition_has_docstring(tree, export)) is not None
        and getattr(importlib.import_module(name), export, None) is obj
    ]
    assert found, f"no definition of {module_name}.{export} found"
    assert all(found), f"{module_name}.{export} is defined without a docstring"


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 ("isort-style"): SCREAMING_SNAKE_CASE, then CamelCase, then the rest.
    if name.isupper() and len(name) > 1:
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_all_is_sorted(module_name):
    exports = list(importlib.import_module(module_name).__all__)
    assert exports == sorted(exports, key=_isort_key)


def test_the_sort_check_can_fail():
    assert sorted(["Runtime", "Clock"], key=_isort_key) != ["Runtime", "Clock"]
    assert sorted(["run", "Runtime"], key=_isort_key) != ["run", "Runtime"]
    assert sorted(["Status", "TERMINAL_STATUSES", "run"], key=_isort_key) == [
        "TERMINAL_STATUSES",
        "Status",
        "run",
    ]


def test_the_package_is_marked_typed():
    assert (PACKAGE_DIR / "py.typed").is_file()


def test_every_init_only_re_exports_and_has_a_docstring():
    for path in PACKAGE_DIR.rglob("__init__.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{path} has no module docstring"
        for node in tree.body:
            assert not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef), (
                f"{path} defines {node.name}; code lives in underscore modules"
            )


def test_every_underscore_module_opens_with_a_docstring():
    for path in PACKAGE_DIR.rglob("_*.py"):
        if path.name == "__init__.py":
            continue
        assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), path


# --------------------------------------------------------------------- errors


def _error_classes() -> list[type[BaseException]]:
    return [obj for obj in vars(hotstate._errors).values() if inspect.isclass(obj) and issubclass(obj, BaseException)]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_derives_from_hotstate_error_and_is_exported(cls):
    assert issubclass(cls, hotstate.HotstateError)
    assert issubclass(cls, Exception)
    assert cls.__name__.endswith("Error")
    assert cls.__name__ in hotstate.__all__
    assert getattr(hotstate, cls.__name__) is cls
    assert cls.__module__ == "hotstate"  # recorded type names use the public path (D.14)


def _error_named(name: str) -> type[BaseException]:
    cls = getattr(hotstate, name, None) or getattr(builtins, name)
    assert isinstance(cls, type)
    assert issubclass(cls, BaseException)
    return cls


E15_TREE = [
    ("HotstateError", ("Exception",)),
    ("ConfigError", ("HotstateError", "ValueError")),
    ("RuntimeClosedError", ("HotstateError",)),
    ("RunError", ("HotstateError",)),
    ("RunNotFoundError", ("RunError", "LookupError")),
    ("WorkflowNotRegisteredError", ("RunError", "LookupError")),
    ("RunFailedError", ("RunError",)),
    ("RunConflictError", ("RunError",)),
    ("PersistenceError", ("HotstateError",)),
    ("StoreUnavailableError", ("PersistenceError",)),
    ("StaleVersionError", ("PersistenceError",)),
    ("CorruptSnapshotError", ("PersistenceError",)),
    ("CodecError", ("PersistenceError",)),
    ("HotstateInternalError", ("HotstateError",)),
]


@pytest.mark.parametrize(("name", "bases"), E15_TREE, ids=[n for n, _ in E15_TREE])
def test_the_error_tree_matches_style_e15(name, bases):
    cls = _error_named(name)
    for base in bases:
        assert issubclass(cls, _error_named(base)), f"{name} should derive from {base}"


@pytest.mark.parametrize(
    ("name", "not_a"),
    [
        ("RunError", "LookupError"),
        ("RunFailedError", "LookupError"),
        ("PersistenceError", "RunError"),
        ("ConfigError", "RunError"),
        ("RuntimeClosedError", "RunError"),
        ("HotstateInternalError", "RunError"),
    ],
)
def test_error_branches_do_not_overlap(name, not_a):
    assert not issubclass(_error_named(name), _error_named(not_a))


def test_nothing_is_named_integrity_error():
    assert not any("IntegrityError" in name for _, name in _exports())


def test_errors_carry_their_fields():
    err = hotstate.ConfigError("RetryPolicy.jitter", 2.0, "must be within [0, 1]")
    assert (err.field, err.value) == ("RetryPolicy.jitter", 2.0)
    assert "RetryPolicy.jitter" in str(err)
    assert "2.0" in str(err)
    assert hotstate.RunNotFoundError("r9").run_id == "r9"
    stale = hotstate.StaleVersionError("sqlite", "r1", stored=5, attempted=4)
    assert (stale.tier, stale.stored, stale.attempted) == ("sqlite", 5, 4)
    assert hotstate.WorkflowNotRegisteredError("r1", "order").workflow == "order"
    conflict = hotstate.RunConflictError("o1", "order", 1, "refund", 2)
    assert (conflict.run_id, conflict.workflow, conflict.workflow_version) == ("o1", "order", 1)
    assert (conflict.requested, conflict.requested_version) == ("refund", 2)
    late = hotstate.DurabilityTimeoutError("sqlite", "not durable", run_id="r1", version=3)
    assert (late.tier, late.run_id, late.version) == ("sqlite", "r1", 3)
    assert isinstance(late, TimeoutError)


def test_the_docstring_check_can_fail():
    tree = ast.parse(
        "class A:\n    x = 1\n"
        "def f():\n    return 1\n"
        "B = 1\n"
        "C: int = 2\n'''C is documented.'''\n"
        "@dataclass\nclass D:\n    '''D is documented.'''\n"
    )
    assert _definition_has_docstring(tree, "A") is False
    assert _definition_has_docstring(tree, "f") is False
    assert _definition_has_docstring(tree, "B") is False
    assert _definition_has_docstring(tree, "C") is True
    assert _definition_has_docstring(tree, "D") is True
    assert _definition_has_docstring(tree, "E") is None


def test_the_hotstate_logger_has_a_null_handler_so_a_library_never_prints_unasked():
    import logging

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("hotstate").handlers)
