"""The order lifecycle: placed -> payment confirmed (signal) -> shipped (signal) -> delivered.

Order A meets a carrier outage once: the ship step fails, is retried after a
backoff, and succeeds. Order B's carrier rejects it for good: the run gives up,
refunds the payment and releases the stock (compensations, newest first), and
lands in the dead-letter store. Every transition is printed as it happens, with
where each order is at that moment.

Run it: ``python -m examples.order_lifecycle``
"""

from __future__ import annotations

from typing import Any

import anyio

import hotstate
import hotstate.runtime
from hotstate import RetryPolicy, RunFailedError, Runtime, Step, StepContext, Workflow


class CarrierDownError(ConnectionError):
    """Transient: worth retrying."""


class AddressRejectedError(ValueError):
    """Permanent: retrying cannot help."""


outages = {"order-A": 1}  # the carrier is down for order A's first attempt


async def place(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**order, "stock_reserved": True}


async def confirm_payment(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**order, "paid": ctx.signal["amount"]}


async def ship(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if order["address"] == "nowhere":
        raise AddressRejectedError(f"carrier cannot deliver to {order['address']!r}")
    if outages.get(ctx.run_id, 0) > 0:
        outages[ctx.run_id] -= 1
        raise CarrierDownError("carrier API timed out")
    await anyio.sleep(0.01)  # the carrier call
    return {**order, "tracking": f"TRK-{ctx.idempotency_key}"}


async def deliver(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**order, "delivered_to": ctx.signal}


def release_stock(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    print(f"    compensation: release stock of {ctx.run_id} (key {ctx.idempotency_key})")
    return {**order, "stock_reserved": False}


def refund(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    print(f"    compensation: refund {order['paid']} to {ctx.run_id} (key {ctx.idempotency_key})")
    return {**order, "refunded": order["paid"]}


ORDER = Workflow(
    "order",
    [
        Step(fn=place, compensate=release_stock),
        Step(fn=confirm_payment, wait_for="payment_confirmed", compensate=refund),
        Step(fn=ship, wait_for="shipped", retry=RetryPolicy(
            max_attempts=3, initial_delay=0.05, jitter=0.0, non_retryable=(AddressRejectedError,))),
        Step(fn=deliver, wait_for="delivered"),
    ],
)


async def main() -> None:
    async with Runtime([ORDER]) as rt:

        def where(run_id: str) -> str:
            s = rt.get(run_id)
            step = ORDER.steps[s.step].name if s.step < len(ORDER.steps) else "-"
            return f"{run_id}: {s.status:<12} next={step:<16} v{s.version}"

        async def watch(events: hotstate.runtime.Subscription) -> None:
            async with events:
                async for t in events:
                    detail = f"  ({t.detail})" if t.detail else ""
                    print(f"  {t.run_id} v{t.version:<3} {t.kind:<20} -> {t.status}{detail}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, rt.subscribe(workflow="order"))
            a = await rt.spawn(ORDER, {"item": "lamp", "address": "1 Main St"}, run_id="order-A")
            b = await rt.spawn(ORDER, {"item": "sofa", "address": "nowhere"}, run_id="order-B")
            await anyio.sleep(0.02)
            print("where now:", where("order-A"), "|", where("order-B"))
            for run in (a, b):
                await run.send("payment_confirmed", {"amount": 42})
                await run.send("shipped")
            await anyio.sleep(0.3)  # A's retry after its backoff; B gives up
            print("where now:", where("order-A"), "|", where("order-B"))
            await a.send("delivered", "front door")
            print("order-A finished:", await a.wait_finished())
            try:
                await b.wait_finished()
            except RunFailedError as exc:
                print(f"order-B failed for good: {exc}")
            for letter in rt.dead_letters():
                print(f"dead letter: {letter.run_id} {letter.error.summary}; "
                      f"{len(letter.attempts)} attempt(s); final payload {letter.snapshot.payload}")
            stats = rt.statistics().supervisor
            print(f"supervisor: {stats.failures} failures, {stats.retries} retries, {stats.give_ups} give-ups, "
                  f"{stats.dead_letters} dead letter(s)")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    hotstate.run(main)
