"""SQLiteStore on an SQLite built without the JSON functions: transitions and conflicts, with the same results."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from hotstate import Status, Transition, TransitionKind
from hotstate.persistence import RunHeader, SQLiteStore, StoredSnapshot, _sqlite as sqlite_module

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize("json_functions", [True, False])
async def test_transitions_round_trip_with_and_without_sqlite_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_functions: bool
) -> None:
    monkeypatch.setattr(sqlite_module, "_json_available", lambda: json_functions)
    batch = [
        Transition("r1", v, TransitionKind.step, v - 1, Status.running, 1_700_000_000.123456789 + v, None)
        for v in range(1, 50)
    ]
    batch.append(Transition("r1", 50, TransitionKind.signal, 49, Status.waiting, 0.1, 'ünïcode "detail"'))
    async with SQLiteStore(tmp_path / "t.db") as store:
        first = await store.save([], batch)
        again = await store.save([], batch[:10])  # a retried batch adds nothing
        history = await store.history("r1")
    assert (first.transitions, again.transitions) == (50, 0)
    assert history == batch


def stored(run_id: str, version: int) -> StoredSnapshot:
    header = RunHeader(run_id, "orders", 1, version, version - 1, "running", 1_700_000_000.0, 1)
    return StoredSnapshot(header, None, b"body of " + run_id.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("json_functions", [True, False])
async def test_conflicts_are_the_same_with_and_without_sqlite_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_functions: bool
) -> None:
    """Without JSON functions the conflict query goes in VALUES chunks of 400 runs: 1,000 runs take three."""
    monkeypatch.setattr(sqlite_module, "_json_available", lambda: json_functions)
    ids = [f"run-{i:04d}" for i in range(1_000)]
    async with SQLiteStore(tmp_path / "c.db") as store:
        await store.save([stored(r, 9 if i % 3 == 0 else 1) for i, r in enumerate(ids)], [])
        # Every run twice (v5 then v2), and a run saved at its stored version.
        batch = [stored(r, v) for v in (5, 2) for r in ids]
        result = await store.save(batch, [])
        again = await store.save([stored("run-0000", 9)], [])
    held = {r: 9 for i, r in enumerate(ids) if i % 3 == 0}
    assert result.conflicts == held
    assert (result.written, result.stale) == (len(ids) - len(held), len(batch) - len(ids) + len(held))
    assert (again.stale, again.conflicts) == (1, {})


@pytest.mark.parametrize("json_functions", [True, False])
async def test_a_nul_in_a_run_id_keeps_its_history_and_its_conflicts_with_and_without_sqlite_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_functions: bool
) -> None:
    """json_extract() ends text at a NUL: a batch holding one goes row by row, or "a\\x00b" would become "a"."""
    monkeypatch.setattr(sqlite_module, "_json_available", lambda: json_functions)
    nul = "a\x00b"
    async with SQLiteStore(tmp_path / "n.db") as store:
        first = await store.save(
            [stored(nul, 4), stored("a", 1)],
            [Transition(nul, 4, TransitionKind.step, 3, Status.running, 1.0, "x\x00y")],
        )
        result = await store.save([stored(nul, 2), stored("a", 2)], [])
        assert (first.written, first.transitions) == (2, 1)
        assert await store.history("a") == []
        assert [(t.run_id, t.detail) for t in await store.history(nul)] == [(nul, "x\x00y")]
        assert result.conflicts == {nul: 4}
        assert (await store.load(nul)) == stored(nul, 4)
