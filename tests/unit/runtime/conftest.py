"""Fixtures shared by the runtime unit tests: a manual clock, a seeded rng, and ``until``."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from hotstate.testing import ManualClock, checkpoint_until

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def until() -> Callable[[Callable[[], bool]], Awaitable[None]]:
    return checkpoint_until
