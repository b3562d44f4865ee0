"""Acknowledged means durable where the policy says so (#10): one call, SIGKILL, read the stores.

Each trial is a child process (ack_child.py) that starts a runtime with eight
runs stepping every millisecond (so a group commit is in flight and the tiers
hold unflushed work), makes one acknowledged call, prints what it acknowledged
and SIGKILLs itself before anything else can run. The parent then opens the
acknowledging tier's files or keys itself and checks the change is there:

- ``spawn``: the run's v1;
- ``send``: the snapshot holding the signal (the run is busy in an earlier step,
  so the signal is still pending); ``send_consumed``: the run was waiting for
  it, so the stored copy holds it pending or is past the step that took it;
- ``cancel``: ``cancelled`` at the version the caller saw;
- ``wait_finished``: ``done`` at the final version; ``wait_failed``: the same
  call raising RunFailedError, ``failed`` at the final version;
- ``retry_dead_letter``: the retried version, ``running``.

Policies: SQLite write-through (synchronous FULL), Valkey write-through, and
write-behind Valkey 10 ms + SQLite 1 s with ``ack_tiers=["sqlite"]`` (checked in
SQLite only: Valkey may lag). The control shows the check can fail: the same
spawn under write-behind SQLite with a 60 s interval is never in SQLite at the
kill without ``ack_tiers``, and always with it.

Children run two at a time (distinct files, run ids and key prefixes): both
cores are busy, which varies where in the group commit the kill lands. For
reliability runs, 20 trials per (policy, op):
``HOTSTATE_ACK_TRIALS=20 pytest -m slow tests/integration/test_ack_durability.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import Snapshot, Status, Transition, TransitionKind
from hotstate.persistence import PickleCodec, SQLiteStore, ValkeyStore
from hotstate.persistence._records import decode_snapshot

if TYPE_CHECKING:
    from hotstate.persistence import Store

CHILD = Path(__file__).with_name("ack_child.py")
_spec = importlib.util.spec_from_file_location("ack_child", CHILD)
assert _spec is not None
assert _spec.loader is not None
_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_child)
KEY: bytes = _child.KEY

# policy -> the tier whose durability every acknowledgement waits for.
ACK_TIER = {"sqlite-through": "sqlite", "valkey-through": "valkey", "behind+ack": "sqlite"}
OPS: tuple[str, ...] = _child.OPS
CONCURRENT = 2  # children at a time (the machine has 2 cores)
TRIALS = 4  # per (policy, op) in the default run
# Reliability runs: HOTSTATE_ACK_TRIALS=20 adds a `slow` parametrization with that
# many trials per (policy, op) (about 75 s on 2 cores for 20). Not collected
# otherwise: the default run does not deselect `slow`, and keeps this file ~10 s.
SLOW_TRIALS = int(os.environ.get("HOTSTATE_ACK_TRIALS", "0"))
GUARD = 30  # seconds for one batch of children; a hang guard only


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    """What one child acknowledged and what the acknowledging tier holds after the kill."""

    policy: str
    op: str
    run_id: str
    acked: int
    # rt.get(run_id).version right after the call: may be ahead of `acked` and not
    # durable yet (the run moved on in memory). It was, for send_consumed under
    # write-through, in 13 of 60 trials at 46a98e5, so the checks use `acked`.
    seen: int
    seen_status: str
    stored: Snapshot | None
    history: dict[int, Transition]


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }


async def run_trial(policy: str, op: str, number: int, *, workdir: Path, valkey_url: str, prefix: str) -> Trial:
    """Run one child to its SIGKILL and read its acknowledging tier."""
    run_id = f"{op}-{number}"
    db = workdir / f"{run_id}.db"
    trial_prefix = f"{prefix}:{number}"  # under the fixture's prefix: its keys are deleted after the test
    proc = await anyio.run_process(
        [sys.executable, str(CHILD), op, policy, str(db), valkey_url, trial_prefix, run_id],
        check=False,
        env=child_env(),
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"{policy} {op} #{number}: exit {proc.returncode}\n{stderr}"
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert (line["op"], line["run_id"]) == (op, run_id)
    tier = ACK_TIER.get(policy, "sqlite")
    store: Store = SQLiteStore(db) if tier == "sqlite" else ValkeyStore(valkey_url, prefix=trial_prefix, read_only=True)
    async with store:
        raw = await store.load(run_id)
        history = {t.version: t for t in await store.history(run_id)}
    stored = None if raw is None else decode_snapshot(raw, PickleCodec(KEY), tier=tier)
    return Trial(
        policy=policy,
        op=op,
        run_id=run_id,
        acked=line["acked"],
        seen=line["version"],
        seen_status=line["status"],
        stored=stored,
        history=history,
    )


async def run_trials(
    policy: str, op: str, numbers: range, *, workdir: Path, valkey_url: str, prefix: str
) -> list[Trial]:
    """Run the trials ``numbers``, CONCURRENT children at a time."""
    trials: list[Trial] = []

    async def one(number: int) -> None:
        trials.append(await run_trial(policy, op, number, workdir=workdir, valkey_url=valkey_url, prefix=prefix))

    for start in range(numbers.start, numbers.stop, CONCURRENT):
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                for number in range(start, min(start + CONCURRENT, numbers.stop)):
                    tg.start_soon(one, number)
    assert len(trials) == len(numbers)
    return trials


def signal_names(snap: Snapshot) -> list[str]:
    return [name for name, _ in snap.signals]


def assert_kept(trial: Trial) -> None:
    """The change ``trial`` acknowledged is in its acknowledging tier."""
    t, snap = trial, trial.stored
    where = f"{t.policy} {t.op} {t.run_id}: acknowledged v{t.acked}"
    assert snap is not None, f"{where}, nothing stored"
    assert snap.version >= t.acked, f"{where}, stored v{snap.version} ({snap.status.value})"
    assert t.acked in t.history, f"{where}, stored history {sorted(t.history)}"
    transition = t.history[t.acked]
    if t.op == "spawn":
        assert transition.kind is TransitionKind.spawned
        assert snap.payload["op"] == "spawn"
    elif t.op == "send":
        assert t.seen == t.acked  # the busy step holds the run: nothing moved after the signal
        assert transition.kind is TransitionKind.signal
        assert snap.signals == (("go", {"sent": t.run_id}),), f"{where}, stored v{snap.version} {snap.signals}"
        assert snap.step == 0
    elif t.op == "send_consumed":
        assert transition.kind is TransitionKind.signal
        consumed = snap.step >= 1 and snap.payload["got"] == {"sent": t.run_id}
        assert signal_names(snap) == ["go"] or (consumed and signal_names(snap) == []), (
            f"{where}, stored v{snap.version} step {snap.step} signals {snap.signals}"
        )
    elif t.op == "cancel":
        assert (t.seen, t.seen_status) == (t.acked, "cancelled")
        assert (snap.version, snap.status) == (t.acked, Status.cancelled), where
        assert transition.kind is TransitionKind.cancelled
    elif t.op == "wait_finished":
        assert (t.seen, t.seen_status) == (t.acked, "done")
        assert (snap.version, snap.status) == (t.acked, Status.done), where
        assert snap.payload["n"] == 3
    elif t.op == "wait_failed":
        assert (t.seen, t.seen_status) == (t.acked, "failed")
        assert (snap.version, snap.status) == (t.acked, Status.failed), where
        assert snap.error is not None
        assert snap.error.message == "first attempt fails"
    else:  # retry_dead_letter: the retried step runs again and stays busy
        assert (t.seen, t.seen_status) == (t.acked, "running")
        assert transition.kind is TransitionKind.dead_letter_retried
        assert (snap.version, snap.status, snap.error) == (t.acked, Status.running, None), where


def matrix(trials: int, *marks: pytest.MarkDecorator) -> list[Any]:
    return [
        pytest.param(policy, op, trials, id=f"{policy}-{op}-x{trials}", marks=marks)
        for policy in ACK_TIER
        for op in OPS
    ]


@pytest.mark.parametrize(
    ("policy", "op", "trials"), [*matrix(TRIALS), *(matrix(SLOW_TRIALS, pytest.mark.slow) if SLOW_TRIALS else [])]
)
async def test_an_acknowledged_change_survives_a_sigkill_right_after_the_call(
    tmp_path: Path, valkey_url: str, valkey_prefix: str, policy: str, op: str, trials: int
) -> None:
    results = await run_trials(policy, op, range(trials), workdir=tmp_path, valkey_url=valkey_url, prefix=valkey_prefix)
    for trial in results:
        assert_kept(trial)


@pytest.mark.parametrize("ack", [False, True], ids=["without-ack_tiers", "with-ack_tiers"])
async def test_control_a_write_behind_spawn_is_lost_at_the_kill_unless_ack_tiers_names_the_tier(
    tmp_path: Path, valkey_url: str, valkey_prefix: str, ack: bool
) -> None:
    policy = "sqlite-behind-60s+ack" if ack else "sqlite-behind-60s"
    results = await run_trials(
        policy, "spawn", range(TRIALS), workdir=tmp_path, valkey_url=valkey_url, prefix=valkey_prefix
    )
    for trial in results:
        assert (trial.seen, trial.seen_status) in ((1, "pending"), (2, "running"))  # spawn returned
        if ack:
            assert_kept(trial)
        else:
            # No flush is due for 60 s: the returned spawn was only in memory.
            assert trial.stored is None
            assert trial.history == {}
