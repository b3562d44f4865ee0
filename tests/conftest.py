"""Marks every test by its folder, so `-m "not integration"` is the fast inner loop."""

from __future__ import annotations

from pathlib import Path

import pytest

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).relative_to(_TESTS).parts
        if parts and parts[0] in ("integration", "contract"):
            item.add_marker(pytest.mark.integration)
