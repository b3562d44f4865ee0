"""``Store.delete_copy``: compare and delete one run's snapshot, on every store (#11).

The persister calls it for a copy that claims a newer version but does not
verify (a forged header): only that exact copy goes, its history stays, and
the run can be written again below the forged version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hotstate import Status, Transition, TransitionKind
from hotstate.persistence import RunHeader, StoredSnapshot

if TYPE_CHECKING:
    from hotstate.persistence import Store


def stored(run_id: str, version: int, body: bytes, status: str = "running") -> StoredSnapshot:
    return StoredSnapshot(RunHeader(run_id, "orders", 1, version, 0, status, 1_700_000_000.0, 1), None, body)


async def test_delete_copy_removes_only_the_copy_it_was_shown(store: Store) -> None:
    history = [Transition("r1", 1, TransitionKind.step, 0, Status.running, 1_700_000_000.5, None)]
    await store.save([stored("r1", 1000, b"forged"), stored("r2", 3, b"other")], history)
    assert not await store.delete_copy("r1", b"something else")  # changed since it was read: kept
    assert (await store.load("r1")) is not None
    assert await store.delete_copy("r1", b"forged")
    assert await store.load("r1") is None
    assert [h.run_id for h in await store.scan()] == ["r2"]  # gone from the listings too
    assert [t.version for t in await store.history("r1")] == [1]  # its history stays
    assert not await store.delete_copy("r1", b"forged")  # nothing left to delete
    result = await store.save([stored("r1", 4, b"genuine")], [])
    assert result.written == 1  # written again below the forged version
    assert (await store.load("r1")).body == b"genuine"  # type: ignore[union-attr]
    assert not await store.delete_copy("missing", b"x")
