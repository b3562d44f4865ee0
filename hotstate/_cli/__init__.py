"""The ``hotstate`` command line: ``bench``, ``advise``, ``demo``, ``runs``.

An application on top of the three layers: it may import any of them, and no
layer imports it. Each subcommand module exposes ``register(subparsers)``, which
adds its parser and sets ``func(args) -> int`` (the exit status).
"""

from __future__ import annotations

from hotstate._cli._main import main

__all__ = ["main"]
