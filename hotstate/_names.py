"""What hotstate accepts as a run id, a signal, workflow or step name, and a dedupe key (issue #11).

These strings reach every tier: a run id is repeated in every transition row
and key (a 1 MB id made 57 MB of SQLite for 50 steps), and SQLite's
``json_extract`` stops at a NUL (a run id with one overwrote another run's
history). So each is a non-empty ``str`` of at most a byte limit in UTF-8,
encodable as UTF-8 (no lone surrogates), without control characters (C0,
DEL, C1). Every public entry that takes one checks it here and raises
``ConfigError`` naming the field. The checks take ``object`` on purpose: they
exist for callers that ignore the type hints.
"""

from __future__ import annotations

import re
from typing import Final

from hotstate._errors import ConfigError

__all__ = [
    "MAX_DEDUPE_KEY_BYTES",
    "MAX_NAME_BYTES",
    "MAX_RUN_ID_BYTES",
    "dedupe_key",
    "name",
    "run_id",
]

MAX_RUN_ID_BYTES: Final = 256
"""The longest run id, in bytes of UTF-8 (a UUID is 36; an id is in every transition row)."""

MAX_NAME_BYTES: Final = 128
"""The longest signal, workflow or step name, in bytes of UTF-8."""

MAX_DEDUPE_KEY_BYTES: Final = 256
"""The longest ``send(dedupe_key=...)``, in bytes of UTF-8 (room for a provider's event id and a prefix)."""

_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
_SHOWN: Final = 40  # characters of a too-long value kept in the error (a 1 MB id must not make a 1 MB message)


def run_id(field: str, value: object) -> str:
    """Return ``value`` as a valid run id, or raise ``ConfigError`` naming ``field``.

    Args:
        field: the argument's name, e.g. ``"spawn.run_id"``.
        value: what the caller passed.

    Returns:
        The id, as a plain ``str``.

    Raises:
        ConfigError: not a str, empty, over ``MAX_RUN_ID_BYTES``, not UTF-8, or
            holding a control character.
    """
    # The common case (printable ASCII) in four C calls: spawn with an id is on W1's path.
    if type(value) is str and value and len(value) <= MAX_RUN_ID_BYTES and value.isascii() and value.isprintable():
        return value
    return _checked(field, value, MAX_RUN_ID_BYTES)


def name(field: str, value: object) -> str:
    """Return ``value`` as a valid signal, workflow or step name, or raise ``ConfigError`` naming ``field``.

    Args:
        field: the argument's name, e.g. ``"send.signal"``.
        value: what the caller passed.

    Returns:
        The name, as a plain ``str``.

    Raises:
        ConfigError: not a str, empty, over ``MAX_NAME_BYTES``, not UTF-8, or
            holding a control character.
    """
    if type(value) is str and value and len(value) <= MAX_NAME_BYTES and value.isascii() and value.isprintable():
        return value
    return _checked(field, value, MAX_NAME_BYTES)


def dedupe_key(field: str, value: object) -> str:
    """Return ``value`` as a valid dedupe key, or raise ``ConfigError`` naming ``field``.

    Raises:
        ConfigError: as for ``run_id``, with ``MAX_DEDUPE_KEY_BYTES``.
    """
    if type(value) is str and value and len(value) <= MAX_DEDUPE_KEY_BYTES and value.isascii() and value.isprintable():
        return value
    return _checked(field, value, MAX_DEDUPE_KEY_BYTES)


def _checked(field: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(field, value, f"must be a str, not {type(value).__name__}")
    text = str.__str__(value)  # a str subclass's own __eq__/__hash__ must not reach the run index
    if not text:
        raise ConfigError(field, text, "must not be empty")
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:
        raise ConfigError(field, _shown(text), f"must be UTF-8 text: {exc.reason} at index {exc.start}") from None
    if size > limit:
        raise ConfigError(field, _shown(text), f"must be at most {limit} bytes of UTF-8, not {size}")
    control = _CONTROL.search(text)
    if control is not None:
        raise ConfigError(
            field, text, f"must not hold control characters ({control.group()!r} at index {control.start()})"
        )
    return text


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}...({len(text)} characters)"
