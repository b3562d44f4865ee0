"""Bad API input at scale: 10,000 runs, some failing, some unpicklable, signals gone astray (#5).

One runtime with a persisted tier (``MemoryStore``: it goes through the same
persister and codec as the real stores, and keeps this test fast). Of the runs:

- 1% raise at their first step on every attempt: retried once, then dead-lettered;
- 1% raise once and then succeed (retries work at scale);
- 1% carry a payload pickle and cloudpickle refuse (a lock, a generator): the
  flush fails only that run, with a ``CodecError`` naming the run and the type;

and the test sends signals to unknown runs (``RunNotFoundError``), to failed and
to finished runs (``RunFinishedError``), and with a name no step waits for
(``ConfigError``). Every other run finishes, and every count adds up exactly.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import (
    CodecError,
    ConfigError,
    RetryPolicy,
    RunFailedError,
    RunFinishedError,
    RunNotFoundError,
    Runtime,
    Status,
    Step,
    StepContext,
    Tier,
    TransitionKind,
    Workflow,
    WorkflowNotRegisteredError,
)
from hotstate.persistence import FlushPolicy, MemoryStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

GUARD = 30  # seconds; a hang guard only
N = 10_000


def kind(i: int) -> str:
    """What run ``i`` is: one of four kinds, each 1% of the runs but "ok"."""
    return {7: "raises", 31: "flaky", 53: "lock", 97: "generator"}.get(i % 100, "ok")


class BadInputError(Exception):
    """The error a bad step raises."""


async def first(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if p["kind"] == "raises" or (p["kind"] == "flaky" and ctx.attempt == 1):
        raise BadInputError(f"bad input in {ctx.run_id}")
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


async def last(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


BULK = Workflow(
    "bulk",
    [
        Step(fn=first, retry=RetryPolicy(max_attempts=2, initial_delay=0.0, jitter=0.0)),
        Step(fn=take, wait_for="go"),
        Step(fn=last),
    ],
)


def numbers() -> Iterator[int]:
    yield 1


def payload(i: int) -> dict[str, Any]:
    k = kind(i)
    p: dict[str, Any] = {"n": i, "kind": k}
    if k == "lock":
        p["bad"] = threading.Lock()
    elif k == "generator":
        p["bad"] = numbers()
    return p


def rid(i: int) -> str:
    return f"run-{i:05d}"


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110 - run counts have no event to wait on
            await anyio.sleep(0.005)


async def sends(rt: Runtime, run_ids: list[str], signal: str = "go") -> tuple[int, Counter[str], list[Exception]]:
    """Send ``signal`` to each run; return (accepted, error type counts, the errors)."""
    ok = 0
    errors: list[Exception] = []
    for run_id in run_ids:
        try:
            await rt.send(run_id, signal, run_id)
            ok += 1
        except (RunNotFoundError, RunFinishedError, ConfigError) as exc:
            errors.append(exc)
    return ok, Counter(type(e).__name__ for e in errors), errors


async def test_ten_thousand_runs_with_bad_input_each_failure_is_typed_and_the_counts_add_up() -> None:
    kinds = Counter(kind(i) for i in range(N))
    assert kinds == {"ok": 9_600, "raises": 100, "flaky": 100, "lock": 100, "generator": 100}
    store = MemoryStore()
    async with Runtime([BULK], tiers=[Tier(store, FlushPolicy(interval=0.05))]) as rt:
        for i in range(N):
            await rt.spawn(BULK, payload(i), run_id=rid(i))
        with pytest.raises(WorkflowNotRegisteredError) as unregistered:
            await rt.spawn("no-such-workflow", {}, run_id="stray")
        assert unregistered.value.run_id == "stray"
        with anyio.fail_after(GUARD):
            await rt.flush()  # the unpicklable payloads fail their runs here
        bad_codec = {rid(i) for i in range(N) if kind(i) in ("lock", "generator")}
        raising = {rid(i) for i in range(N) if kind(i) == "raises"}
        failed = bad_codec | raising
        # Wait for the failures themselves: a run parked at "waiting" may still
        # hold its codec failure in its mailbox, queued for the scheduler.
        await wait_until(
            lambda: rt.count(status="failed") == len(failed) and rt.count(status="waiting") == N - len(failed)
        )
        assert {s.run_id for s in rt.list_runs(status="failed")} == failed
        with pytest.raises(ConfigError, match="no step"):
            await rt.send(rid(0), "no-such-signal")  # a waiting run, a signal no step waits for
        assert rt.get(rid(0)).status is Status.waiting

        # Phase 2: "go" to every run (the failed ones refuse), and to 100 unknown runs.
        unknown = [f"ghost-{i}" for i in range(100)]
        ok, errors, raised = await sends(rt, [rid(i) for i in range(N)] + unknown)
        assert ok == N - len(failed)
        assert errors == {"RunFinishedError": len(failed), "RunNotFoundError": len(unknown)}
        for exc in raised:
            assert isinstance(exc, RunFinishedError | RunNotFoundError)
            if isinstance(exc, RunFinishedError):
                assert exc.run_id in failed
                assert exc.status == "failed"
                assert exc.run_id in str(exc)
            else:
                assert exc.run_id in unknown
        await wait_until(lambda: rt.count(status="done") == N - len(failed))

        # Phase 3: finished runs take no more input.
        done = [rid(i) for i in range(0, N, 100)]  # kind "ok"
        ok, errors, raised = await sends(rt, done)
        assert (ok, errors) == (0, {"RunFinishedError": len(done)})
        assert {e.status for e in raised if isinstance(e, RunFinishedError)} == {"done"}
        for run_id in done[:10]:
            with pytest.raises(RunFinishedError):
                await rt.cancel(run_id)
        with anyio.fail_after(GUARD):
            await rt.flush()

        # The outcome of every run, by kind.
        assert rt.count() == N
        assert rt.count(status="done") == N - len(failed)
        assert rt.count(status="failed") == len(failed)
        for i in range(N):
            snap = rt.get(rid(i))
            if kind(i) in ("ok", "flaky"):
                assert snap.status is Status.done
                assert snap.payload == {"n": i + 2, "kind": kind(i), "got": rid(i)}
        flaky = [rid(i) for i in range(N) if kind(i) == "flaky"]
        assert all(rt.get(r).attempt == 1 for r in flaky)  # the attempt counter restarts at the next step
        assert sum(1 for r in flaky for t in rt.history(r) if t.kind is TransitionKind.step_failed) == len(flaky)

        # Each failure is typed: a dead letter per failed run, nothing more, nothing less.
        letters = {d.run_id: d for d in rt.dead_letters()}
        assert set(letters) == failed
        for run_id in raising:
            letter = letters[run_id]
            assert letter.error.type.endswith("BadInputError")
            assert run_id in letter.error.message
            assert len(letter.attempts) == 2  # retried once, then gave up
        for run_id in bad_codec:
            letter = letters[run_id]
            assert letter.error.type.endswith("CodecError"), letter.error
            assert run_id in letter.error.message
            with pytest.raises(RunFailedError) as info:
                await rt.wait_finished(run_id)
            cause = info.value.__cause__
            assert isinstance(cause, CodecError)
            assert run_id in str(cause)
            assert "lock" in str(cause) or "generator" in str(cause)
        stats = rt.statistics()
        assert stats.internal_errors == 0
        tier = rt.tier_statistics()[0]
        assert tier.codec_errors == len(bad_codec)
        assert tier.failures == 0  # a bad payload never fails the flush for the other runs
        assert tier.pending_snapshots == tier.pending_transitions == 0

    # The store holds every run at its final version, the failed ones too (without the bad payload).
    async with store:  # the runtime closed it; a MemoryStore keeps its data across reopen
        headers = {h.run_id: h for h in await store.scan(limit=N + 1)}
        assert len(headers) == N
        assert Counter(h.status for h in headers.values()) == {"done": N - len(failed), "failed": len(failed)}
        assert {d.run_id for d in await store.dead_letters()} == failed
