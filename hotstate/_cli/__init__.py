"""The ``hotstate`` command line: ``bench``, ``advise``, ``demo``, ``runs``.

The one application on top of the three layers: it may import any of them and
the bench library ``hotstate._bench`` (which never imports it back), and nothing
else imports it. Each subcommand module exposes ``register(subparsers)``, which
adds its parser and sets ``func(args) -> int`` (the exit status).
"""

from __future__ import annotations

from hotstate._cli._main import main

__all__ = ["main"]
