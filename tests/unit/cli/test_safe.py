"""``printable``: stored text shown to an operator never acts on the terminal, and stays distinguishable."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, strategies as st

from hotstate._cli._safe import printable

# Every category a terminal or a reader could be fooled by: controls, format
# (bidi) characters, line/paragraph separators, surrogates.
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# Any code point, surrogates included (a stored string may hold a lone one),
# mixed with the characters an escape is made of, so that texts which look
# like an escape ("\\x1b" typed out) meet the character they name.
_TRICKY = st.sampled_from(["\\", "x", "u", "U", "n", "1", "b", "e", "\n", "\x1b", "\x9b", "\u202e", "\u2028", "\udc80"])
_TEXT = st.text(st.one_of(st.characters(exclude_categories=()), _TRICKY), max_size=40)


def _unescape(shown: str) -> str:
    """The inverse of ``printable``: its escapes are Python's string escapes."""
    return shown.encode("ascii", "backslashreplace").decode("unicode_escape")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("order-7", "order-7"),
        ("a\nb", "a\\nb"),
        ("a\r\n\tb", "a\\r\\n\\tb"),
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
        ("\x1b[2J\x1b[31m", "\\x1b[2J\\x1b[31m"),
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
        ("abc\u202edef", "abc\\u202edef"),
        ("\u2028\u2029\u200b\u2066\ufeff", "\\u2028\\u2029\\u200b\\u2066\\ufeff"),
        ("\U000e0001", "\\U000e0001"),
        ("\udcff", "\\udcff"),
        ("C:\\x1b", "C:\\\\x1b"),
        ("café 日本 a b", "café 日本 a b"),
    ],
)
def test_examples(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_text_with_nothing_to_escape_is_returned_as_is() -> None:
    text = "lin-0 order v1"
    assert printable(text) is text


@given(_TEXT)
def test_the_output_holds_no_control_format_or_separator_character(text: str) -> None:
    shown = printable(text)
    assert not [ch for ch in shown if unicodedata.category(ch) in _UNSAFE]
    assert shown.isprintable()
    assert "\n" not in shown
    shown.encode("utf-8")  # a lone surrogate would not even reach the terminal


@given(_TEXT)
def test_the_escaping_is_reversible_so_distinct_texts_print_differently(text: str) -> None:
    assert _unescape(printable(text)) == text


@given(_TEXT, _TEXT)
def test_distinct_inputs_give_distinct_outputs(a: str, b: str) -> None:
    assert (printable(a) == printable(b)) == (a == b)


def test_a_typed_out_escape_and_the_character_it_names_differ() -> None:
    assert printable("\\x1b") != printable("\x1b")
    assert printable("\\n") != printable("\n")
    assert printable("\\u202e") != printable("\u202e")
