"""Where ``hotstate bench`` writes its figures and ``hotstate advise`` reads them."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_DIR_ENV = "HOTSTATE_BENCH_DIR"


def results_dir() -> Path:
    """The results folder.

    ``$HOTSTATE_BENCH_DIR`` when set; ``./benchmarks/results`` inside a hotstate
    checkout (where the README's command runs); otherwise ``./hotstate-bench``.
    """
    env = os.environ.get(RESULTS_DIR_ENV)
    if env:
        return Path(env)
    if Path("benchmarks").is_dir():
        return Path("benchmarks") / "results"
    return Path("hotstate-bench")
