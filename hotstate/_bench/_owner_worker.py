"""A worker process of the ownership scenarios, and the parent's handle on it (DESIGN.md "Several processes").

``python -m hotstate._bench._owner_worker CONFIG`` (CONFIG: a ``WorkerConfig``
as JSON) runs a ``Runtime`` with tiers [Valkey, SQLite] (SQLite alone when no
Valkey URL is given), or [Valkey, PostgreSQL] with the PostgreSQL authority
(``postgres_url``: processes as on several machines), shard ownership with
short timing and ``recover=True``.
Its first line on stdout is a JSON object: the loopback port of its control
server, its pid (as the parent sees it, also inside its own pid namespace),
its member id. Then the control server takes one JSON command per line
(``{"op": "spawn", ...}``) and answers each with ``{"ok": result}`` or
``{"error": type name, "message": text}``. SIGTERM is a graceful shutdown:
the control server closes, the ``async with`` is left (drain, flush, release
every shard), and the process exits 0.

Workflows (steps sleep a little, so a few workers stay light on 2 cores):

- ``plain``: ``steps`` steps that sleep ``step_sleep``;
- ``signalled``: one such step, then ``waits`` times a step waiting for the
  signal ``sig`` and a sleeping step; the final payload lists the ids of the
  signals received (``payload["signals"]``);
- ``held``: one sleeping step, then a step waiting for ``never`` (it only
  ends cancelled);
- ``w1``: the W1 workflow of ``w1_steps`` steps (``_w1.py``), no ledger (throughput).

Every step of the first three appends one JSON line to the process's ledger
(opened ``O_APPEND``, one ``write`` per line below ``PIPE_BUF``, so lines of
concurrent writers never mix): ``key`` (the idempotency key), ``run``,
``step``, ``version`` (the snapshot version it started from), ``shard``,
``epoch`` (the shard's epoch here, 0 when not owned: a zombie), ``pid``,
``member``, ``t`` (wall time). It also appends ``[step, pid, t, epoch]`` to
``payload["trail"]``, so every stored copy names who executed each step of its
lineage.

The parent's side (``WorkerProcess``, ``Cluster``, ``LeaseWatch``) is in
``_cluster.py``; the scenarios in ``_scenarios.py``, their judge in
``_judge.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from hotstate import FlushPolicy, HotstateError, Ownership, Runtime, Step, StepContext, Tier, Workflow, run
from hotstate._bench import _w1 as w1
from hotstate.persistence import PostgresStore, SQLiteStore, ValkeyStore, shard_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hotstate.persistence import Store

__all__ = ["WorkerConfig", "main", "outer_pid"]


_LINE_LIMIT: Final = 1 << 22  # the longest command or answer line (bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """Everything a worker needs (its one argument, as JSON)."""

    sqlite: str = ""  # the SQLite file: durable tier and lease authority (unless ``postgres_url``)
    valkey_url: str | None = None  # None: the durable tier is the only one
    prefix: str = "hs-own"  # the Valkey key prefix
    postgres_url: str | None = None  # PostgreSQL instead of SQLite: durable tier and lease authority
    schema: str = "hotstate"  # the PostgreSQL schema
    postgres_interval: float = 0.05
    postgres_timeout: float = 10.0  # PostgresStore's and PostgresAuthority's statement and connect timeout
    valkey_timeout: float = 5.0  # ValkeyStore's socket timeout
    ledger: str = ""  # this process's ledger file ('' : none)
    name: str = ""  # the member's label
    shards: int = 16
    ttl: float = 2.0
    renew_every: float = 0.4
    claim_every: float = 0.2
    inbox_every: float = 0.02
    forward_timeout: float = 10.0
    handoff_timeout: float = 5.0
    moves_per_round: int | None = None
    ownership: bool = True  # False: Runtime(ownership=False), one process alone
    valkey_interval: float = 0.01
    sqlite_interval: float = 0.05
    keep_every: int | None = None  # SQLite and Valkey keep a copy every this many versions
    ack_tiers: tuple[str, ...] = ("sqlite",)  # what an acknowledgement waits for
    step_sleep: float = 0.01
    steps: int = 3  # sleeping steps of ``plain``
    waits: int = 2  # signal waits of ``signalled``
    w1_steps: int = 10  # steps of ``w1``
    recover: bool = True
    use_uvloop: bool = True

    def to_json(self) -> str:
        """The config as the worker's argument."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """Parse ``to_json``'s text."""
        fields = json.loads(text)
        fields["ack_tiers"] = tuple(fields.get("ack_tiers", ()))
        return cls(**fields)

    def stores(self) -> list[Store]:
        """New stores on this config's tiers, fastest first (to build tiers, or to read them)."""
        out: list[Store] = []
        if self.valkey_url:
            out.append(
                ValkeyStore(self.valkey_url, prefix=self.prefix, shards=self.shards, socket_timeout=self.valkey_timeout)
            )
        if self.postgres_url:
            out.append(
                PostgresStore(self.postgres_url, schema=self.schema, shards=self.shards, timeout=self.postgres_timeout)
            )
        else:
            out.append(SQLiteStore(self.sqlite, shards=self.shards))
        return out

    @property
    def durable(self) -> str:
        """The durable tier's name: ``postgres`` or ``sqlite``."""
        return "postgres" if self.postgres_url else "sqlite"


def outer_pid() -> int:
    """This process's pid as the parent sees it: in a pid namespace of its own ``getpid()`` is 1.

    ``/proc`` is the parent namespace's mount unless remounted, and its
    ``self`` link names the pid in that namespace.
    """
    with contextlib.suppress(OSError, ValueError):
        return int(os.readlink("/proc/self"))
    return os.getpid()


# ------------------------------------------------------------------ the worker


class _Worker:
    """The runtime, its workflows and the control server of one worker process."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.pid = outer_pid()
        self.member = ""
        self._rt: Runtime | None = None
        self._ledger = os.open(cfg.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if cfg.ledger else -1

    @property
    def rt(self) -> Runtime:
        if self._rt is None:
            raise RuntimeError("the runtime is not open")
        return self._rt

    def workflows(self) -> list[Workflow]:
        cfg = self.cfg
        plain = Workflow("plain", [Step(fn=self._work, name=f"work{i}") for i in range(cfg.steps)])
        signalled = [Step(fn=self._work, name="start")]
        for i in range(cfg.waits):
            signalled += [Step(fn=self._signal, name=f"wait{i}", wait_for="sig"), Step(fn=self._work, name=f"after{i}")]
        held = [Step(fn=self._work, name="start"), Step(fn=self._signal, name="hold", wait_for="never")]
        return [plain, Workflow("signalled", signalled), Workflow("held", held), w1.workflow(cfg.w1_steps)]

    # ------------------------------------------------------------- the steps

    async def _work(self, payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        await anyio.sleep(self.cfg.step_sleep)
        return self._record(payload, ctx)

    async def _signal(self, payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        data = ctx.signal if isinstance(ctx.signal, dict) else {}
        out = self._record(payload, ctx)
        return {**out, "signals": [*payload.get("signals", []), data.get("id")]}

    def _record(self, payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        """Append this execution to the ledger and to the payload's trail."""
        t = time.time()
        shard = shard_of(ctx.run_id, self.cfg.shards)
        owned = self.rt.statistics().ownership
        epoch = owned.owned.get(shard, 0) if owned is not None else 0
        if self._ledger >= 0:
            line = {
                "key": ctx.idempotency_key,
                "run": ctx.run_id,
                "step": ctx.step,
                "version": ctx.version,
                "attempt": ctx.attempt,
                "shard": shard,
                "epoch": epoch,
                "pid": self.pid,
                "member": self.member,
                "t": t,
            }
            os.write(self._ledger, (json.dumps(line) + "\n").encode())  # one write < PIPE_BUF: atomic append
        return {**payload, "trail": [*payload.get("trail", []), [ctx.step, self.pid, t, epoch]]}

    # ------------------------------------------------------ the control server

    async def serve(self, stream: anyio.abc.SocketStream) -> None:
        """Answer one connection's commands, one JSON line each, in order."""
        buffered = BufferedByteReceiveStream(stream)
        async with stream:
            while True:
                try:
                    line = await buffered.receive_until(b"\n", _LINE_LIMIT)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                answer = await self._answer(line)
                try:
                    await stream.send(answer + b"\n")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def _answer(self, line: bytes) -> bytes:
        try:
            command = json.loads(line)
            result = await self._dispatch(command)
            return json.dumps({"ok": result}).encode()
        except Exception as exc:  # noqa: BLE001 - every error is the answer, typed by name
            return json.dumps({"error": type(exc).__name__, "message": str(exc)}).encode()

    async def _dispatch(self, c: dict[str, Any]) -> Any:
        rt = self.rt
        op = c["op"]
        if op == "spawn":
            handle = await rt.spawn(c.get("workflow", "plain"), c.get("payload", {}), run_id=c.get("run_id"))
            return {"run_id": handle.run_id, "created": handle.created}
        if op == "spawn_many":
            return await self._spawn_many(c.get("workflow", "held"), int(c["count"]))
        if op == "send":
            await rt.send(c["run_id"], c.get("signal", "sig"), c.get("data"), dedupe_key=c.get("dedupe_key"))
            return None
        if op == "cancel":
            await rt.cancel(c["run_id"])
            return None
        if op == "wait_finished":
            with anyio.fail_after(float(c.get("timeout", 30.0))):
                return await rt.wait_finished(c["run_id"])
        if op == "locate":
            loc = await rt.locate(c["run_id"])
            return {
                "shard": loc.shard,
                "owner": loc.owner,
                "epoch": loc.epoch,
                "here": loc.here,
                "version": loc.snapshot.version,
                "status": loc.snapshot.status.value,
            }
        if op == "stats":
            return self._stats()
        if op == "flush":
            await rt.flush()
            return None
        if op == "burst":
            return await self._burst(int(c["runs"]))
        if op == "ping":
            return {"pid": self.pid, "member": self.member}
        raise ValueError(f"unknown op {op!r}")

    def _stats(self) -> dict[str, Any]:
        s = self.rt.statistics()
        out: dict[str, Any] = {
            "runs": s.runs,
            "by_status": dict(s.by_status),
            "transitions": s.transitions,
            "internal_errors": s.internal_errors,
            "member": self.member,
            "pid": self.pid,
            "tiers": {
                t.tier: {
                    "flushes": t.flushes,
                    "failures": t.failures,
                    "resets": t.resets,
                    "fenced_rows": t.fenced_rows,
                    "pending_snapshots": t.pending_snapshots,
                    "lag": t.lag,
                }
                for t in s.tiers
            },
        }
        m = s.ownership
        if m is not None:
            out.update(
                owned={str(k): v for k, v in m.owned.items()},
                draining=sorted(m.draining),
                leases={str(k): list(v) for k, v in m.leases.items()},
                members={k: list(v) for k, v in m.members.items()},
                lease_valid_for=m.lease_valid_for,
                claims=m.claims,
                losses=m.losses,
                handoffs=m.handoffs,
                forwarded=m.forwarded,
                applied=m.applied,
            )
        return out

    async def _spawn_many(self, workflow: str, count: int) -> list[str]:
        """Spawn ``count`` runs here at once (they share the acknowledging tier's group commits); their ids."""
        ids: list[str] = []

        async def one() -> None:
            ids.append((await self.rt.spawn(workflow, {})).run_id)

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
        return ids

    async def _burst(self, runs: int) -> dict[str, float]:
        """Spawn ``runs`` runs of ``w1`` here and wait for each: steps done, runs lost, wall-clock start and end.

        A run is lost when its shard left this process before the run was
        durable anywhere (a lease that lapsed under load drops unflushed rows).
        """
        rt = self.rt
        started = time.time()
        t0 = time.perf_counter()
        handles = [await rt.spawn("w1", {"n": 0, "id": f"b{i}", "blob": w1.BLOB}) for i in range(runs)]
        lost = 0
        for h in handles:
            try:
                await h.wait_finished()
            except HotstateError:
                lost += 1
        seconds = time.perf_counter() - t0
        done = float((runs - lost) * self.cfg.w1_steps)
        return {"steps": done, "lost": float(lost), "seconds": seconds, "started": started, "ended": time.time()}


def _runtime(cfg: WorkerConfig, worker: _Worker) -> Runtime:
    policies = {"valkey": FlushPolicy(interval=cfg.valkey_interval, keep_every=cfg.keep_every)}
    policies["sqlite"] = FlushPolicy(interval=cfg.sqlite_interval, keep_every=cfg.keep_every)
    policies["postgres"] = FlushPolicy(interval=cfg.postgres_interval, keep_every=cfg.keep_every)
    stores = cfg.stores()
    tiers = [Tier(store, policies[store.tier]) for store in stores]
    ownership: Ownership | bool = False
    if cfg.ownership:
        durable = stores[-1]
        ownership = Ownership(
            # Named, not left to the default: the PostgreSQL tier's database and schema (design §4.3).
            authority=durable.default_authority(cfg.shards) if isinstance(durable, PostgresStore) else None,
            shards=cfg.shards,
            ttl=cfg.ttl,
            renew_every=cfg.renew_every,
            claim_every=cfg.claim_every,
            inbox_every=cfg.inbox_every,
            forward_timeout=cfg.forward_timeout,
            handoff_timeout=cfg.handoff_timeout,
            moves_per_round=cfg.moves_per_round,
            name=cfg.name,
        )
    ack = [t for t in cfg.ack_tiers if any(store.tier == t for store in stores)]
    return Runtime(worker.workflows(), tiers=tiers, recover=cfg.recover, ownership=ownership, ack_tiers=ack)


async def _main(cfg: WorkerConfig) -> None:
    worker = _Worker(cfg)
    async with _runtime(cfg, worker) as rt:
        worker._rt = rt
        stats = rt.statistics().ownership
        worker.member = stats.member if stats is not None else ""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - anyio's typed attributes, not Django
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with listener, anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, worker.serve)
                hello = {"port": port, "pid": worker.pid, "member": worker.member, "t": time.time()}
                print(json.dumps(hello), flush=True)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()  # no more commands; then leaving the runtime hands every shard off
    logging.getLogger("hotstate.bench").info("worker %d: shut down gracefully", worker.pid)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker: ``python -m hotstate._bench._owner_worker CONFIG``."""
    args = sys.argv[1:] if argv is None else list(argv)
    cfg = WorkerConfig.from_json(args[0])
    faulthandler.enable()  # a crash in C code (the loop, sqlite) leaves its stack in the log
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s: %(message)s")
    logging.getLogger("hotstate.ownership").setLevel(logging.INFO)
    logging.getLogger("hotstate.bench").setLevel(logging.INFO)
    run(_main, cfg, use_uvloop=cfg.use_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
