"""Validation of user-given options: one place, errors that name the field (STYLE.md E.17).

The checks take ``object`` on purpose: they exist for callers that ignore the
type hints, which mypy would otherwise call redundant.
"""

from __future__ import annotations

import math

from hotstate._errors import ConfigError


def number(field: str, value: object, *, minimum: float = 0.0, strict: bool = False, finite: bool = True) -> float:
    """Return ``value`` as a float, or raise ``ConfigError`` naming ``field``.

    Args:
        field: the option's name, e.g. ``"FlushPolicy.interval"``.
        value: what the caller passed.
        minimum: the lowest allowed value.
        strict: the value must be above ``minimum``, not equal to it.
        finite: reject NaN and infinities.

    Returns:
        The value.

    Raises:
        ConfigError: not a number (bools are not numbers), or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(field, value, "must be a number")
    if finite and not math.isfinite(value):
        raise ConfigError(field, value, "must be a finite number")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(field, value, f"must be {'>' if strict else '>='} {minimum:g}")
    return float(value)


def integer(field: str, value: object, *, minimum: int = 0) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise ``ConfigError`` naming ``field``.

    Raises:
        ConfigError: not an int (bools are not ints), or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, value, f"must be an int >= {minimum}")
    if value < minimum:
        raise ConfigError(field, value, f"must be an int >= {minimum}")
    return value


def text(field: str, value: object) -> str:
    """Return ``value`` if it is a non-empty str, else raise ``ConfigError``.

    Raises:
        ConfigError: not a non-empty str.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(field, value, "must be a non-empty str")
    return value
