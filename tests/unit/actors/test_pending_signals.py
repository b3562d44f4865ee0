# mypy: allow-untyped-defs
"""``Signals``: pending signals read like a tuple of pairs, append in O(1), and never change under an older snapshot."""

from __future__ import annotations

import copy
import operator
import pickle
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from hotstate.actors import Snapshot, Status, _snapshot
from hotstate.actors._snapshot import DEDUPE_KEYS_KEPT, Signals

PAIRS = (("a", 1), ("b", {"x": [1]}), ("a", None))


def test_it_reads_like_the_tuple_of_pairs_it_replaces():
    sig = Signals(PAIRS)
    assert sig == PAIRS
    assert operator.eq(PAIRS, sig)  # tuple == Signals, through Signals.__eq__
    assert sig != PAIRS[:2]
    assert sig != list(PAIRS)  # as a tuple would
    assert (len(sig), bool(sig), bool(Signals())) == (3, True, False)
    assert list(sig) == list(PAIRS)
    assert (sig[0], sig[-1], sig[1:]) == (PAIRS[0], PAIRS[-1], PAIRS[1:])
    with pytest.raises(IndexError):
        sig[3]
    with pytest.raises(IndexError):
        sig[-4]
    assert ("b", {"x": [1]}) in sig
    assert [name for name, _ in sig] == ["a", "b", "a"]
    assert Signals() == ()
    assert hash(Signals((("a", 1),))) == hash((("a", 1),))
    assert repr(Signals((("a", 1),))) == "Signals([('a', 1)])"
    assert (sig.count_of("a"), sig.count_of("b"), sig.count_of("z")) == (2, 1, 0)


def test_it_pickles_and_copies_as_a_plain_tuple():
    sig = Signals(PAIRS).appended("c", 3).without_first("a")
    unpickled = pickle.loads(pickle.dumps(sig))  # noqa: S301 - bytes this test just made
    for back in (unpickled, copy.copy(sig), copy.deepcopy(sig)):
        assert type(back) is tuple
        assert back == (("b", {"x": [1]}), ("a", None), ("c", 3))
    assert b"hotstate" not in pickle.dumps(sig)


def test_snapshots_compare_equal_whichever_form_their_signals_take():
    fields = ("r1", "w", 1, 2, 0, Status.waiting, None, None, 0.0, 1)
    assert Snapshot(*fields, signals=Signals(PAIRS)) == Snapshot(*fields, signals=PAIRS)
    assert Snapshot(*fields, signals=Signals()) == Snapshot(*fields)


def test_of_takes_a_decoded_tuple_or_list_and_returns_signals_as_they_are():
    sig = Signals.of(PAIRS)
    assert type(sig) is Signals
    assert Signals.of(sig) is sig
    decoded: Any = [["a", 1]]  # as a codec gives the pairs back
    assert Signals.of(decoded) == (("a", 1),)
    malformed: Any = [("a", 1, 2)]
    with pytest.raises(ValueError, match="unpack"):
        Signals.of(malformed)


def test_appending_to_the_newest_shares_its_list_and_an_older_one_branches_off():
    """O(1) per send: the newest window extends the shared list in place; an older window copies (white box)."""
    first = Signals().appended("a", 1)
    second = first.appended("b", 2)
    third = second.appended("c", 3)
    assert first._items is second._items is third._items
    branch = second.appended("x", 9)  # second is not the newest window any more
    assert branch._items is not third._items
    assert tuple(map(tuple, (first, second, third, branch))) == (
        (("a", 1),),
        (("a", 1), ("b", 2)),
        (("a", 1), ("b", 2), ("c", 3)),
        (("a", 1), ("b", 2), ("x", 9)),
    )


def test_dropping_the_oldest_shares_the_list_until_most_of_it_is_dropped():
    sig = Signals()
    for i in range(200):
        sig = sig.appended("item", i)
    first_list = sig._items
    for _ in range(100):
        sig = sig.without_first("item")
    assert sig._items is first_list  # half of it dropped: still shared
    sig = sig.without_first("item")
    assert sig._items is not first_list  # copied once more than half was dropped
    assert list(sig) == [("item", i) for i in range(101, 200)]
    assert len(sig._items) <= 200


def test_without_first_removes_the_oldest_of_that_name_only():
    sig = Signals((("a", 1), ("b", 2), ("a", 3), ("b", 4)))
    assert sig.without_first("b") == (("a", 1), ("a", 3), ("b", 4))
    assert sig.without_first("a") == (("b", 2), ("a", 3), ("b", 4))
    assert sig.without_first("z") is sig
    assert sig == (("a", 1), ("b", 2), ("a", 3), ("b", 4))


operations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=50), st.booleans(), st.sampled_from("abc")), max_size=120
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_every_version_keeps_its_value_whatever_is_done_to_the_others(ops):
    """Any version (not only the newest) may be appended to or consumed from: none ever changes (model: tuples)."""
    versions: list[tuple[Signals, tuple[tuple[str, int], ...]]] = [(Signals(), ())]
    for n, (pick, append, name) in enumerate(ops):
        sig, model = versions[pick % len(versions)]
        if append:
            versions.append((sig.appended(name, n), (*model, (name, n))))
        else:
            at = next((i for i, (sig_name, _) in enumerate(model) if sig_name == name), None)
            versions.append((sig.without_first(name), model if at is None else model[:at] + model[at + 1 :]))
        for version, expected in versions:
            assert version == expected
            assert len(version) == len(expected)
            assert all(version.count_of(c) == sum(1 for s, _ in expected if s == c) for c in "abc")


# ------------------------------------------------------------------ dedupe keys


def test_dedupe_keys_are_remembered_beside_the_pairs_and_not_compared():
    sig = Signals().appended("a", 1, "k1").appended("b", 2).appended("a", 3, "k2")
    assert (sig.dedupe, sig.has_key("k1"), sig.has_key("k2"), sig.has_key("k3")) == (("k1", "k2"), True, True, False)
    consumed = sig.without_first("a").without_first("a")
    assert consumed == (("b", 2),)
    assert consumed.dedupe == ("k1", "k2")  # consumed signals stay deduplicated
    assert sig == (("a", 1), ("b", 2), ("a", 3))  # keys are not part of equality
    assert Signals(sig, dedupe=["x", "y", "x"]).dedupe == ("x", "y")
    fields = ("r1", "w", 1, 2, 0, Status.waiting, None, None, 0.0, 1)
    assert Snapshot(*fields, signals=sig).dedupe == ("k1", "k2")
    assert Snapshot(*fields, signals=(("a", 1),)).dedupe == ()  # a decoded tuple has none


def test_only_the_newest_keys_are_kept():
    sig = Signals()
    for k in range(DEDUPE_KEYS_KEPT + 10):
        sig = sig.appended("a", k, f"k{k}")
    assert len(sig.dedupe) == DEDUPE_KEYS_KEPT
    assert sig.dedupe[0] == "k10"
    assert not sig.has_key("k9")
    assert sig.has_key("k10")
    assert sig.has_key(f"k{DEDUPE_KEYS_KEPT + 9}")
    assert len(Signals(dedupe=(f"k{k}" for k in range(DEDUPE_KEYS_KEPT + 5))).dedupe) == DEDUPE_KEYS_KEPT


key_operations = st.lists(st.tuples(st.integers(min_value=0, max_value=50), st.sampled_from("abcdef")), max_size=150)


@settings(max_examples=300, deadline=None)
@given(key_operations, st.sampled_from([3, DEDUPE_KEYS_KEPT]))
def test_every_version_keeps_its_keys_whatever_is_added_to_the_others(ops, kept):
    """Keys added to any version (not only the newest) never change another version's keys (model: tuples).

    With 3 kept, keys leave the window and come back, and the shared list is copied when most of it is dropped.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_snapshot, "DEDUPE_KEYS_KEPT", kept)
        patch.setattr(_snapshot, "_COMPACT_AT", 4)
        versions: list[tuple[Signals, tuple[str, ...]]] = [(Signals(), ())]
        for pick, key in ops:
            sig, model = versions[pick % len(versions)]
            if sig.has_key(key):
                assert key in model
                continue
            assert key not in model
            versions.append((sig.appended("s", None, key), (*model, key)[-kept:]))
            for version, expected in versions:
                assert version.dedupe == expected
                assert all(version.has_key(k) == (k in expected) for k in "abcdef")
