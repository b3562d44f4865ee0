"""The benchmark library behind ``hotstate bench`` (and ``python -m benchmarks``).

Workloads, ceilings, the SIGKILL harness and the suites live here so an
installed hotstate can run them; the command line is ``hotstate._cli``, which
calls ``run_bench``, and this package never imports it. Every figure is
reported beside a ceiling measured in the same run.
"""

from __future__ import annotations

from hotstate._bench._suites import DEFAULT_SUITES, SUITES, BenchOptions, run_bench

__all__ = ["DEFAULT_SUITES", "SUITES", "BenchOptions", "run_bench"]
