"""Run the benchmarks: ``python -m benchmarks`` is ``hotstate bench`` (see ``--help``)."""

from __future__ import annotations

import sys

from hotstate._cli._bench import main

if __name__ == "__main__":
    sys.exit(main())
