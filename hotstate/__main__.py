"""``python -m hotstate``: the ``hotstate`` command."""

from __future__ import annotations

import sys

from hotstate._cli import main

if __name__ == "__main__":
    sys.exit(main())
