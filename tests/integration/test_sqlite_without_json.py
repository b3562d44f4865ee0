"""SQLiteStore on an SQLite built without the JSON functions: transitions go row by row, with the same result."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from hotstate import Status, Transition, TransitionKind
from hotstate.persistence import SQLiteStore, _sqlite as sqlite_module

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
