"""What keeps runs: stores, the codec, and the write-behind persister (see DESIGN.md).

This layer may import data types from ``hotstate.actors``, never the runtime.
"""

from __future__ import annotations

__all__: list[str] = []
