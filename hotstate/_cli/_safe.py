"""Stored text made safe for an operator's terminal (a leaf).

Whoever can write to a store chooses the run ids, workflow names, errors and
transition details that ``hotstate runs`` prints. Printed raw, a newline forges
a table row and an escape sequence (``ESC ]0;...BEL``, ``ESC [2J``, the C1
``CSI``) or a bidi override (U+202E) acts on the terminal instead of showing.
"""

from __future__ import annotations

from typing import Final

__all__ = ["printable"]

_NAMED: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""``text`` with every character a terminal would act on shown as a visible escape.

    Escaped: what ``str.isprintable`` rejects (control characters C0, DEL and
    C1; format characters Cf, bidi overrides and isolates among them; line and
    paragraph separators U+2028/U+2029; surrogates, which would not even encode;
    private-use and unassigned code points; spaces other than ``" "``), as
    ``\n``, ``\r``, ``\t``, ``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN`` (the
    forms Python's ``repr`` uses), and the backslash itself as ``\\``, so
    that distinct texts always print differently. Text with nothing to
    escape is returned as is.

    Args:
        text: text read from a store.

    Returns:
        The text to print.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape, text))
