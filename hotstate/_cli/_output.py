"""Output helpers shared by the ``hotstate`` subcommands: JSON and error lines.

Tables come from ``hotstate._bench._table``, a leaf the bench library prints with too.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def print_json(value: Any, *, file: TextIO | None = None) -> None:
    """Write ``value`` as indented JSON (``default=str`` for enums, paths and times)."""
    print(json.dumps(value, indent=2, sort_keys=True, default=str), file=file or sys.stdout)


def fail(message: str, *, status: int = 1) -> int:
    """Print ``hotstate: message`` on stderr and return ``status`` (the exit code)."""
    print(f"hotstate: {message}", file=sys.stderr)
    return status
