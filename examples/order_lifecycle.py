"""The order lifecycle: placed -> payment confirmed (signal) -> shipped (signal) -> delivered.

The workflow is ``hotstate._bench._orders.order_workflow`` (the one ``hotstate demo``
runs on many orders through a crash). Order A meets a carrier outage once: the
ship step fails, is retried after a backoff, and succeeds. Order B's carrier
rejects it for good: the run gives up, refunds the payment and releases the
stock (compensations, newest first), and lands in the dead-letter store. Every
transition is printed as it happens, with where each order is at that moment.

Run it: ``python -m examples.order_lifecycle``
"""

from __future__ import annotations

from typing import Any

import anyio

import hotstate
import hotstate.runtime
from hotstate import RunFailedError, Runtime, StepContext
from hotstate._bench._orders import new_order, order_workflow


def show_compensation(effect: str, ctx: StepContext, order: dict[str, Any]) -> None:
    if effect == "refund":
        print(f"    compensation: refund {order['paid']} to {ctx.run_id} (key {ctx.idempotency_key})")
    elif effect == "release_stock":
        print(f"    compensation: release stock of {ctx.run_id} (key {ctx.idempotency_key})")


ORDER = order_workflow(show_compensation)


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
            a = await rt.spawn(ORDER, new_order("lamp", "1 Main St", carrier_outages=1), run_id="order-A")
            b = await rt.spawn(ORDER, new_order("sofa", "nowhere"), run_id="order-B")
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
                print(
                    f"dead letter: {letter.run_id} {letter.error.summary}; "
                    f"{len(letter.attempts)} attempt(s); final payload {letter.snapshot.payload}"
                )
            stats = rt.statistics().supervisor
            print(
                f"supervisor: {stats.failures} failures, {stats.retries} retries, {stats.give_ups} give-ups, "
                f"{stats.dead_letters} dead letter(s)"
            )
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    hotstate.run(main)
