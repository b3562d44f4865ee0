"""Where ``examples/order_lifecycle.py`` imports the order workflow from; it lives in ``hotstate._bench._orders``.

The demo's orders run in the SIGKILL harness's child, part of the bench
library, so the workflow moved there with them.
"""

from __future__ import annotations

from hotstate._bench._orders import new_order, order_workflow

__all__ = ["new_order", "order_workflow"]
