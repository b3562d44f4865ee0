"""``run``: one call to run an async main on uvloop where it exists, else plain asyncio."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple, Unpack

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["run", "uvloop_available"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def uvloop_available() -> bool:
    """Return True when uvloop can be imported on this platform."""
    return importlib.util.find_spec("uvloop") is not None


def run(main: Callable[[Unpack[Ts]], Awaitable[T]], *args: *Ts, use_uvloop: bool = True) -> T:
    """Run ``main(*args)`` in a new event loop and return its result.

    Args:
        main: the async function to run.
        *args: its positional arguments.
        use_uvloop: use uvloop when it is installed (the default); plain
            asyncio otherwise or when False.

    Returns:
        What ``main`` returned.
    """
    options = {"use_uvloop": use_uvloop and uvloop_available()}
    return anyio.run(main, *args, backend="asyncio", backend_options=options)
