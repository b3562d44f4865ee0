"""The installed distribution's metadata agrees with the package and with pyproject.toml.

These read the metadata pip installed, so after changing pyproject.toml or
``hotstate.__version__`` reinstall (``pip install -e .``) before running them.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import hotstate

if TYPE_CHECKING:
    from importlib.metadata import PackageMetadata

ROOT = Path(__file__).parents[2]


def metadata() -> PackageMetadata:
    return importlib.metadata.metadata("hotstate")


def test_installed_version_is_hotstate_version() -> None:
    assert importlib.metadata.version("hotstate") == hotstate.__version__


def test_the_version_has_one_source_hotstate_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]


def test_the_license_is_the_mit_expression_and_its_text_ships() -> None:
    assert metadata()["License-Expression"] == "MIT"
    assert metadata().get_all("License-File") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the hotstate authors" in text


def test_python_classifiers_match_requires_python_and_name_this_python() -> None:
    assert metadata()["Requires-Python"] == ">=3.11"
    prefix = "Programming Language :: Python :: 3."
    minors = [
        c.removeprefix("Programming Language :: Python :: ")
        for c in metadata().get_all("Classifier") or []
        if c.startswith(prefix) and c.removeprefix(prefix).isdecimal()
    ]
    assert minors == ["3.11", "3.12", "3.13", "3.14"]
    # A run on a Python not listed is a reminder to add its classifier.
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in minors


def test_project_urls_point_at_the_repository() -> None:
    urls = dict(entry.split(", ", 1) for entry in metadata().get_all("Project-URL") or [])
    assert sorted(urls) == ["Changelog", "Documentation", "Homepage", "Issues"]
    assert all(url.startswith("https://github.com/hotstate/hotstate") for url in urls.values())
