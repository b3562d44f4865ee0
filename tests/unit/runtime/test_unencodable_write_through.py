"""Under write-through, a run whose last snapshot cannot be encoded gives a typed error, never a hang (#11)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from hotstate import CodecError, FlushPolicy, Runtime, Step, StepContext, Tier, Workflow
from hotstate.persistence import MemoryStore


async def first(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return p


async def unencodable(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"lock": threading.Lock()}


WF = Workflow("wf", [Step(fn=first), Step(fn=unencodable)])


async def test_waiting_for_a_version_that_cannot_be_encoded_raises_the_codec_error() -> None:
    async with Runtime([WF], tiers=[Tier(MemoryStore(), FlushPolicy.through())]) as rt:
        await rt.spawn(WF, {}, run_id="r")
        with anyio.fail_after(5):
            while rt.get("r").version < 3:  # noqa: ASYNC110 - no event for a version
                await anyio.sleep(0.001)
            await rt.flush()
            # A caller that arrives after the flush found the payload unencodable.
            with pytest.raises(CodecError, match="lock"):
                await rt.wait_finished("r")
            with pytest.raises(CodecError, match="lock"):
                await rt.wait_durable("r")
