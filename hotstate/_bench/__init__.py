"""The benchmark suites behind ``hotstate bench`` (and ``python -m benchmarks``).

Workloads and ceilings live here so an installed hotstate can run them; the
checkout's ``benchmarks/`` folder is the documented entry point and holds the
results. Every figure is reported beside a ceiling measured in the same run.
"""

from __future__ import annotations

from hotstate._bench._main import main, register

__all__ = ["main", "register"]
