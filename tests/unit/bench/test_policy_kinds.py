"""The bench's policy spelling with a PostgreSQL tier, and how skipped figures are reported (no server needed)."""

from __future__ import annotations

import pytest

from hotstate import FlushPolicy
from hotstate._bench._policy import POLICIES, Policy, TierSpec, find_policy, postgres_schema
from hotstate._bench._suites import Bench, BenchOptions, _summary
from hotstate.persistence import PostgresStore, SQLiteStore, ValkeyStore
from hotstate.persistence._postgres_common import check_schema


@pytest.mark.parametrize(
    ("spec", "tiers", "write_through", "interval"),
    [
        ("postgres:0.1", (TierSpec("postgres", 0.1),), False, 0.1),
        ("valkey:0.01,postgres:1.0", (TierSpec("valkey", 0.01), TierSpec("postgres", 1.0)), False, 0.01),
        ("postgres:through", (TierSpec("postgres", None),), True, 0.0),
        ("valkey:0.01,postgres:1.0:ack", (TierSpec("valkey", 0.01), TierSpec("postgres", 1.0, ack=True)), False, 0.01),
    ],
)
def test_a_postgres_tier_parses_and_prints_back(spec, tiers, write_through, interval):
    policy = Policy.parse(spec)
    assert policy.tiers == tiers
    assert (policy.write_through, policy.interval) == (write_through, interval)
    assert policy.spec == spec
    assert Policy.parse(policy.spec) == policy


def test_the_named_postgres_policies_and_a_built_one():
    assert find_policy("postgres-behind").spec == "postgres:0.1"
    assert find_policy("write-behind postgres").spec == "valkey:0.01,postgres:1.0"
    assert find_policy("write-through postgres, group commit") is POLICIES["write-through postgres"]
    built = find_policy("postgres-behind 0.25")
    assert (built.spec, built.name) == ("postgres:0.25", "postgres-behind 250 ms")
    assert find_policy("postgres:through,valkey:0.01").acknowledging == ("postgres",)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pg:1", r"unknown tier 'pg' in policy 'pg:1' \(choose from valkey, sqlite, postgres\)"),
        ("postgres", r"bad interval '' for tier 'postgres' in policy 'postgres': seconds > 0 or 'through'"),
        ("postgres:soon", r"bad interval 'soon' for tier 'postgres'"),
        ("postgres:0", r"bad interval '0' for tier 'postgres'"),
        ("valkey:0.01,postgres:-1", r"bad interval '-1' for tier 'postgres' in policy 'valkey:0.01,postgres:-1'"),
        ("postgres:nan", r"bad interval 'nan'"),
        ("postgres:inf", r"bad interval 'inf'"),
        ("postgres:1:fast", r"unknown flag 'fast' in policy 'postgres:1:fast' \(only 'ack'\)"),
    ],
)
def test_a_bad_policy_spec_is_refused_with_a_message_naming_the_part(spec, message):
    with pytest.raises(ValueError, match=message):
        Policy.parse(spec)


def test_postgres_tiers_need_a_url(tmp_path):
    policy = Policy.parse("valkey:0.01,postgres:1")
    with pytest.raises(ValueError, match=r"has a postgres tier: it needs a PostgreSQL URL \(--postgres-url\)"):
        policy.build_tiers(sqlite=tmp_path / "a.db", valkey_url="valkey://x", prefix="bench-1")
    with pytest.raises(ValueError, match="needs a PostgreSQL URL"):
        policy.stores(sqlite=tmp_path / "a.db", valkey_url="valkey://x", prefix="bench-1")


def test_postgres_tiers_write_in_a_schema_named_after_the_prefix(tmp_path):
    policy = Policy.parse("postgres:through,sqlite:0.5,valkey:0.01")
    url = "postgresql://postgres@127.0.0.1:1/postgres"  # a store connects at open, never here
    tiers = policy.build_tiers(
        sqlite=tmp_path / "a.db", valkey_url="valkey://x", prefix="bench-1000-42", postgres_url=url
    )
    assert [t.policy for t in tiers] == [FlushPolicy.through(), FlushPolicy(interval=0.5), FlushPolicy(interval=0.01)]
    store = tiers[0].store
    assert isinstance(store, PostgresStore)
    assert (store.url, store.schema) == (url, "bench_1000_42")
    assert isinstance(tiers[1].store, SQLiteStore)
    assert isinstance(tiers[2].store, ValkeyStore)


@pytest.mark.parametrize(
    ("prefix", "schema"),
    [("bench-1000-123", "bench_1000_123"), ("Bench.X", "bench_x"), ("9-lives", "hs_9_lives"), ("", "hs_")],
)
def test_a_schema_name_is_a_plain_sql_name(prefix, schema):
    assert postgres_schema(prefix) == schema
    assert check_schema("schema", schema) == schema


def test_a_long_prefix_gives_a_schema_of_at_most_63_characters():
    schema = postgres_schema("bench-" + "7" * 100)
    assert len(schema) == 63
    assert check_schema("schema", schema) == schema


def test_skipped_figures_are_printed_recorded_and_listed_in_the_summary_with_their_reason(tmp_path, capsys):
    b = Bench(BenchOptions(), None, tmp_path, no_postgres="no PostgreSQL server: no binaries")
    b.figure("hotstate memory-only", 1000.0, "steps/s")
    b.skip("PostgresStore.save", b.no_postgres)
    b.skip("persister -> postgres", b.no_postgres)
    assert "skipped  (no PostgreSQL server: no binaries)" in capsys.readouterr().out
    assert b.skipped == [
        {"name": "PostgresStore.save", "reason": "no PostgreSQL server: no binaries"},
        {"name": "persister -> postgres", "reason": "no PostgreSQL server: no binaries"},
    ]
    lines = _summary(b.figures, b.skipped).splitlines()
    assert lines[2].startswith("hotstate memory-only")
    assert lines[3].split() == ["PostgresStore.save", "-", "skipped", "(see", "below)"]
    assert lines[-1] == "skipped: no PostgreSQL server: no binaries"  # each reason once
    assert lines[-2].startswith("persister -> postgres")
