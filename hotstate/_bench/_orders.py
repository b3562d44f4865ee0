"""The order lifecycle: the workflow of ``examples/order_lifecycle.py`` and the workload of ``hotstate demo``.

placed -> payment confirmed (signal) -> shipped (signal) -> delivered (signal).
Placing reserves stock (undone by releasing it); confirming the payment charges
the customer (undone by a refund). Shipping calls the carrier: a carrier outage
(``CarrierDownError``) is transient and retried, a rejected address
(``AddressRejectedError``) is permanent, so the run gives up, refunds and
releases the stock (newest first), and is dead-lettered.

Every side effect (charge, ship, refund, ...) is reported to an optional
``EffectSink`` with the step context, whose ``idempotency_key`` lets the sink
deduplicate effects that run again after a crash.

``OrderLoad`` runs a fixed set of orders in a SIGKILL harness child
(``_child.py``): simulated payment, warehouse and carrier systems send each
waiting order its next signal after a random delay, every side effect goes to
an append-only ledger as an ``Effect`` line, and the child reports
``Progress``, ``Recovered`` and ``Finished`` to ``hotstate demo``'s live view.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio

from hotstate import RetryPolicy, Step, StepContext, Workflow

if TYPE_CHECKING:
    from hotstate import Runtime, Snapshot
    from hotstate._bench._trace import TraceWriter
    from hotstate.persistence import Store

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
    return {"item": item, "address": address, "amount": amount, "carrier_outages": carrier_outages, "compensations": []}


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


# ------------------------------------------------------------- the demo's load

_TICK = 0.01
_WAIT_RANGES: Final = {"payment_confirmed": (0.2, 1.2), "shipped": (0.2, 1.5), "delivered": (0.2, 1.2)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Orders:
    """A fixed set of orders for one worker generation (part of the child's ``ChildConfig``)."""

    tag: str  # the demo's unique tag: run ids are "{tag}-order-0000", ...
    count: int
    fail_index: int  # the order designed to fail for good (its address is undeliverable)
    ledger: str  # the side-effect ledger file, appended to
    gen: int = 1  # 1 takes orders as they arrive; 2 starts with recovery
    seed: str = "0"  # seeds the simulated delays
    pace: float = 1.0  # scales every simulated delay
    arrivals: float = 3.0  # seconds over which generation 1's orders arrive (scaled by pace)


@dataclass(frozen=True, slots=True, kw_only=True)
class Effect:
    """One side effect as the outside world recorded it: a line of the ledger."""

    key: str  # the step's idempotency key: the same when the step runs again
    effect: str  # reserve_stock, charge, ship, deliver, refund or release_stock
    run_id: str
    gen: int  # the worker generation that made it
    at: float  # wall-clock time


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """Where the orders are: a child message every ``report_interval``, and one at the end."""

    gen: int
    t: float  # seconds since the child started
    table: dict[str, int]  # orders by "where|status", where as ``where`` names it
    lags: dict[str, float]  # per tier, the age of its oldest unflushed transition (s)
    retries: int
    transitions: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """What recovery brought back: a child message, once, from generation 2."""

    resumed: int
    by_tier: dict[str, int]  # resumed orders by the tier their copy came from
    corrupt: int
    lost: int
    unregistered: int
    seconds: float
    already_finished: int  # orders a tier held as finished (dead-lettered included)
    respawned: int  # orders no tier held, placed anew


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """Every order has finished and the tiers hold it: the child's last message."""

    dead_letters: list[str]  # the orders the tiers hold a dead letter for
    compensations: dict[str, list[str]]  # per order not delivered, the compensations it ran


def order_ids(tag: str, orders: int) -> list[str]:
    """The run ids of one demo's orders: ``["{tag}-order-0000", ...]``."""
    return [f"{tag}-order-{i:04d}" for i in range(orders)]


def order_payload(index: int, fail_index: int) -> dict[str, Any]:
    """Order ``index``'s payload: every tenth meets one carrier outage; ``fail_index`` is undeliverable."""
    address = UNDELIVERABLE if index == fail_index else f"{index} Main St"
    return new_order(f"item-{index % 7}", address, amount=10 + index % 90, carrier_outages=int(index % 10 == 3))


class OrderLoad:
    """A child's side of ``hotstate demo``: place the orders, drive them to their end, report.

    Args:
        orders: the orders of this generation.
        trace: the child's trace (every order is registered in it up front).
        stores: the runtime's stores (the dead letters are read back from them).
        send: writes a message to the parent.
        report_interval: seconds between ``Progress`` messages.
    """

    def __init__(
        self,
        orders: Orders,
        trace: TraceWriter,
        stores: list[Store],
        send: Callable[[Progress | Recovered | Finished], None],
        report_interval: float,
    ) -> None:
        self.orders = orders
        self.ids = order_ids(orders.tag, orders.count)
        for i, rid in enumerate(self.ids):
            trace.register(rid, i)
        trace.slots[trace.layout.STARTED] = orders.count
        self.trace = trace
        self.stores = stores
        self.send = send
        self.every = report_interval
        self.workflow = order_workflow(self._record)
        self.workflows = [self.workflow]
        self._ledger = open(orders.ledger, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed by run()
        self._rng = random.Random(f"{orders.seed}-{orders.gen}")
        self._due: dict[tuple[str, str], float] = {}
        self._spawned: set[str] = set()
        self._started = time.monotonic()

    def _record(self, effect: str, ctx: StepContext, order: dict[str, Any]) -> None:
        self.trace.step_started(ctx)
        line = Effect(key=ctx.idempotency_key, effect=effect, run_id=ctx.run_id, gen=self.orders.gen, at=time.time())
        self._ledger.write(json.dumps(dataclasses.asdict(line)) + "\n")

    async def run(self, rt: Runtime) -> None:
        """Spawn and drive every order until all have finished; then flush and say ``Finished``."""
        try:
            recovered = _recovered(rt, self.ids) if self.orders.gen > 1 else None
            self._spawned = {rid for rid in self.ids if _in_memory(rt, rid)}
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report, rt)
                tg.start_soon(self._spawn_all, rt, recovered)
                while not all(rid in self._spawned and rt.get(rid).finished for rid in self.ids):
                    await self._tick(rt)
                    await anyio.sleep(_TICK)
                tg.cancel_scope.cancel()
            await rt.flush()
            self.send(self._progress(rt))
            mine = set(self.ids)
            letters = {d.run_id for store in self.stores for d in await store.dead_letters() if d.run_id in mine}
            self.send(
                Finished(
                    dead_letters=sorted(letters),
                    compensations={
                        rid: rt.get(rid).payload["compensations"] for rid in self.ids if rt.get(rid).status != "done"
                    },
                )
            )
        finally:
            self._ledger.close()

    def _progress(self, rt: Runtime) -> Progress:
        table: Counter[str] = Counter()
        for rid in self._spawned:
            snap = rt.get(rid)
            table[f"{where(self.workflow, snap)}|{snap.status}"] += 1
        stats = rt.statistics()
        return Progress(
            gen=self.orders.gen,
            t=time.monotonic() - self._started,
            table=dict(table),
            lags={t.tier: t.lag for t in stats.tiers},
            retries=stats.supervisor.retries,
            transitions=stats.transitions,
        )

    async def _report(self, rt: Runtime) -> None:
        while True:
            self.send(self._progress(rt))
            await anyio.sleep(self.every)

    async def _tick(self, rt: Runtime) -> None:
        """Send each waiting order its signal once its random delay has passed."""
        now = time.monotonic()
        for rid in self.ids:  # in order, so the seed decides which order gets which delay
            if rid not in self._spawned:
                continue
            snap = rt.get(rid)
            signal = next_signal(self.workflow, snap)
            if signal is None:
                continue
            due = self._due.get((rid, signal))
            if due is None:
                lo, hi = _WAIT_RANGES[signal]
                self._due[(rid, signal)] = now + self._rng.uniform(lo, hi) * self.orders.pace
            elif now >= due:
                await rt.send(
                    rid, signal, {"amount": snap.payload["amount"]} if signal == "payment_confirmed" else None
                )

    async def _spawn_all(self, rt: Runtime, recovered: dict[str, Any] | None) -> None:
        """Generation 1: orders arrive over ``arrivals`` seconds. Later: every order not in memory, now.

        ``spawn`` is idempotent on the run id, so an order a store holds (finished
        ones too) comes back as it was, and only orders no tier ever saw start anew.
        """
        spread = self.orders.arrivals * self.orders.pace if self.orders.gen == 1 else 0.0
        started = time.monotonic()
        for i, rid in enumerate(self.ids):
            delay = started + spread * i / max(1, len(self.ids)) - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)  # the orders' arrival times, not a synchronisation
            known = rid in self._spawned
            await rt.spawn(self.workflow, order_payload(i, self.orders.fail_index), run_id=rid)
            self._spawned.add(rid)
            if recovered is not None and not known:
                # finished in a store before the crash: not resumed, but durable
                recovered["already_finished" if rt.get(rid).finished else "respawned"] += 1
        if recovered is not None:
            self.send(Recovered(**recovered))


def _recovered(rt: Runtime, ids: list[str]) -> dict[str, Any]:
    """What recovery brought back, read before any resumed step runs (dead-lettered runs come back finished)."""
    report = rt.recovery_report
    assert report is not None  # noqa: S101 - recover=True sets it
    mine = set(ids)
    resumed = [r for r in report.resumed if r.run_id in mine]
    return {
        "resumed": len(resumed),
        "by_tier": dict(Counter(r.tier for r in resumed)),
        "corrupt": len(report.corrupt),
        "lost": len(report.lost),
        "unregistered": len(report.unregistered),
        "seconds": report.seconds,
        "already_finished": sum(d.run_id in mine for d in rt.dead_letters()),
        "respawned": 0,
    }


def _in_memory(rt: Runtime, rid: str) -> bool:
    try:
        rt.get(rid)
    except LookupError:
        return False
    return True
