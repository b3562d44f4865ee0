"""The order lifecycle workflow shared by ``hotstate demo`` and ``examples/order_lifecycle.py``.

placed -> payment confirmed (signal) -> shipped (signal) -> delivered (signal).
Placing reserves stock (undone by releasing it); confirming the payment charges
the customer (undone by a refund). Shipping calls the carrier: a carrier outage
(``CarrierDownError``) is transient and retried, a rejected address
(``AddressRejectedError``) is permanent, so the run gives up, refunds and
releases the stock (newest first), and is dead-lettered.

Every side effect (charge, ship, refund, ...) is reported to an optional
``EffectSink`` with the step context, whose ``idempotency_key`` lets the sink
deduplicate effects that run again after a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio

from hotstate import RetryPolicy, Step, StepContext, Workflow

if TYPE_CHECKING:
    from hotstate import Snapshot

__all__ = [
    "SIGNALS",
    "AddressRejectedError",
    "CarrierDownError",
    "EffectSink",
    "new_order",
    "next_signal",
    "order_workflow",
    "where",
]

EffectSink: TypeAlias = Callable[[str, StepContext, dict[str, Any]], None]
"""``sink(effect, ctx, order)``: called once per side effect a step or compensation makes."""

SIGNALS: Final = ("payment_confirmed", "shipped", "delivered")
"""The signals an order waits for, in order."""

UNDELIVERABLE: Final = "nowhere"
"""The address the carrier rejects for good."""


class CarrierDownError(ConnectionError):
    """The carrier's API timed out: transient, worth retrying."""


class AddressRejectedError(ValueError):
    """The carrier cannot deliver to the address: permanent, retrying cannot help."""


def new_order(item: str, address: str, *, amount: int = 42, carrier_outages: int = 0) -> dict[str, Any]:
    """Build an order's initial payload.

    Args:
        item: what was ordered.
        address: where it goes; ``"nowhere"`` is rejected by the carrier for good.
        amount: the price, charged when the payment is confirmed.
        carrier_outages: how many ship attempts meet a carrier outage first.

    Returns:
        The payload.
    """
    return {"item": item, "address": address, "amount": amount, "carrier_outages": carrier_outages,
            "compensations": []}


def order_workflow(effect: EffectSink | None = None, *, carrier_delay: float = 0.01) -> Workflow:
    """Build the ``order`` workflow.

    Args:
        effect: receives every side effect (see ``EffectSink``), or None.
        carrier_delay: seconds the carrier call takes (the ship step suspends).

    Returns:
        The workflow: place, confirm_payment, ship, deliver.
    """

    def emit(name: str, ctx: StepContext, order: dict[str, Any]) -> None:
        if effect is not None:
            effect(name, ctx, order)

    async def place(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        emit("reserve_stock", ctx, order)
        return {**order, "stock_reserved": True}

    async def confirm_payment(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        emit("charge", ctx, order)
        return {**order, "paid": order["amount"]}

    async def ship(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if order["address"] == UNDELIVERABLE:
            raise AddressRejectedError(f"carrier cannot deliver to {order['address']!r}")
        if ctx.attempt <= order.get("carrier_outages", 0):
            raise CarrierDownError("carrier API timed out")
        await anyio.sleep(carrier_delay)  # the carrier call
        emit("ship", ctx, order)
        return {**order, "tracking": f"TRK-{ctx.idempotency_key}"}

    async def deliver(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        emit("deliver", ctx, order)
        return {**order, "delivered_to": ctx.signal or order["address"]}

    def release_stock(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        emit("release_stock", ctx, order)
        return {**order, "stock_reserved": False, "compensations": [*order["compensations"], "release_stock"]}

    def refund(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        emit("refund", ctx, order)
        return {**order, "refunded": order["paid"], "compensations": [*order["compensations"], "refund"]}

    ship_retry = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0.0, non_retryable=(AddressRejectedError,))
    return Workflow(
        "order",
        [
            Step(fn=place, compensate=release_stock),
            Step(fn=confirm_payment, wait_for="payment_confirmed", compensate=refund),
            Step(fn=ship, wait_for="shipped", retry=ship_retry),
            Step(fn=deliver, wait_for="delivered"),
        ],
    )


def next_signal(workflow: Workflow, snap: Snapshot) -> str | None:
    """The signal a waiting order needs next, or None when it needs none now.

    None too when that signal is already queued in the snapshot (sending it
    again would queue a second one).

    Args:
        workflow: the order workflow.
        snap: the run's latest snapshot.

    Returns:
        The signal's name, or None.
    """
    if snap.status != "waiting" or snap.step >= len(workflow.steps):
        return None
    wanted = workflow.steps[snap.step].wait_for
    if wanted is None or any(name == wanted for name, _ in snap.signals):
        return None
    return wanted


def where(workflow: Workflow, snap: Snapshot) -> str:
    """Name the step an order is at: the next step's name, or ``finished``.

    Args:
        workflow: the order workflow.
        snap: the run's latest snapshot.

    Returns:
        A step name, or ``"finished"`` for done, failed and cancelled runs.
    """
    if snap.status in ("done", "failed", "cancelled"):
        return "finished"
    if snap.status == "compensating":
        return "compensating"
    return workflow.steps[snap.step].name if snap.step < len(workflow.steps) else "finished"
