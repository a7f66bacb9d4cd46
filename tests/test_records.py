"""The pure row <-> record mappers and timestamp codecs, without a database."""
from __future__ import annotations

import datetime as dt
from typing import Any

import peewee
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from better_agent_peewee import RecordError
from better_agent_peewee.dialects import Dialect, detect_dialect
from better_agent_peewee.records import TABLES, message_id
from better_agent_peewee.timestamps import MAX_TIMESTAMP_MS, parse_iso_ms
from tests.samples import SAMPLES, TABLE_NAMES, expected_read, fresh, thread

# Unconnected database objects: building a dialect must not need a server.
DIALECTS = {
    "sqlite": detect_dialect(peewee.SqliteDatabase(":memory:")),
    "postgres": detect_dialect(peewee.PostgresqlDatabase("nowhere")),
    "mysql": detect_dialect(peewee.MySQLDatabase("nowhere")),
}
UTC = dt.timezone.utc


def mapper(dialect: str, table: str) -> Any:
    return TABLES[table].make_mapper(DIALECTS[dialect])


@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize("table", TABLE_NAMES)
@pytest.mark.parametrize("which", ["minimal", "full"])
def test_to_row_from_row_round_trip(dialect: str, table: str, which: str) -> None:
    sample = SAMPLES[table]
    rec = getattr(sample, which)
    m = mapper(dialect, table)
    row = m.to_row(sample.key, fresh(rec))
    spec = TABLES[table]
    assert len(row) == len(spec.columns)
    assert row[spec.columns.index(spec.key_column)] == sample.key
    assert m.from_row(row) == expected_read(table, rec)
    for field, column in sample.optional.items():  # absent -> NULL column
        if field not in sample.minimal:
            absent = m.to_row(sample.key, fresh(sample.minimal))
            assert absent[spec.columns.index(column)] is None


def test_to_row_does_not_change_the_record() -> None:
    rec = SAMPLES["memoryMessages"].full
    before = fresh(rec)
    mapper("postgres", "memoryMessages").to_row(SAMPLES["memoryMessages"].key, rec)
    assert rec == before


def test_message_row_keeps_columns_out_of_the_json() -> None:
    m = mapper("sqlite", "memoryMessages")
    sample = SAMPLES["memoryMessages"]
    id_, thread_id, run_id, body, created = m.to_row(sample.key, fresh(sample.full))
    assert (id_, thread_id, run_id, created) == (sample.key, "t1", "r1", "2023-11-14T22:13:20.000Z")
    assert body.startswith("{") and '"threadId"' not in body and '"createdAt"' not in body
    assert '"toolCalls"' in body and '"id":"m1"' in body  # compact JSON, as JSON.stringify writes it
    assert message_id("t1", 5, "m1") == "t1:5:m1"


def test_json_is_compact_and_keeps_unicode() -> None:
    m = mapper("sqlite", "memoryThreads")
    row = m.to_row("t1", thread(state={"a": [1, 2], "s": "é😀"}))
    assert row[TABLES["memoryThreads"].columns.index("state")] == '{"a":[1,2],"s":"é😀"}'


# -- timestamps ------------------------------------------------------------------------------

@pytest.mark.parametrize("ms, text", [
    (0, "1970-01-01T00:00:00.000Z"),
    (1, "1970-01-01T00:00:00.001Z"),
    (999, "1970-01-01T00:00:00.999Z"),
    (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
    (951_782_400_007, "2000-02-29T00:00:00.007Z"),
    (MAX_TIMESTAMP_MS, "9999-12-31T23:59:59.999Z"),
])
def test_timestamp_codecs(ms: int, text: str) -> None:
    sqlite, postgres, mysql = DIALECTS["sqlite"], DIALECTS["postgres"], DIALECTS["mysql"]
    assert sqlite.encode_ts(ms) == text
    assert sqlite.decode_ts(text) == ms
    as_datetime = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ms)
    assert mysql.encode_ts(ms) == as_datetime and mysql.encode_ts(ms).tzinfo is None
    assert postgres.encode_ts(ms) == as_datetime.replace(tzinfo=UTC)
    assert mysql.decode_ts(as_datetime) == ms
    assert postgres.decode_ts(as_datetime.replace(tzinfo=UTC)) == ms
    if ms < MAX_TIMESTAMP_MS - 3_600_000:  # an aware datetime in another zone is the same instant
        eastern = as_datetime.replace(tzinfo=UTC).astimezone(dt.timezone(dt.timedelta(hours=-5)))
        assert postgres.decode_ts(eastern) == ms


@pytest.mark.parametrize("text, ms", [
    ("2023-11-14T22:13:20.123Z", 1_700_000_000_123),
    ("2023-11-14T22:13:20.123z", 1_700_000_000_123),
    ("2023-11-14 22:13:20.123", 1_700_000_000_123),
    ("2023-11-14T22:13:20.123", 1_700_000_000_123),
    ("2023-11-14T22:13:20.123+00:00", 1_700_000_000_123),
    ("2023-11-14T23:13:20.123+01:00", 1_700_000_000_123),
    ("2023-11-14T23:13:20.123+0100", 1_700_000_000_123),
    ("2023-11-14T17:13:20.123-05:00", 1_700_000_000_123),
    ("2023-11-15T03:43:20.123+05:30", 1_700_000_000_123),
    ("2023-11-14 22:13:20.123456", 1_700_000_000_123),   # microseconds are truncated, not rounded
    ("2023-11-14 22:13:20.123999", 1_700_000_000_123),
    ("2023-11-14T22:13:20.1234567891Z", 1_700_000_000_123),
    ("2023-11-14T22:13:20.1Z", 1_700_000_000_100),
    ("2023-11-14T22:13:20Z", 1_700_000_000_000),
    ("2023-11-14 22:13:20", 1_700_000_000_000),
    ("2023-11-14 22:13:20 +01:00", 1_700_000_000_000 - 3_600_000),
    (" 2023-11-14T22:13:20.123Z ", 1_700_000_000_123),
    ("1970-01-01T00:00:00.000Z", 0),
    ("1970-01-01T01:00:00.000+01:00", 0),
])
def test_parse_iso_ms_forms(text: str, ms: int) -> None:
    assert parse_iso_ms(text) == ms
    assert DIALECTS["sqlite"].decode_ts(text) == ms


@pytest.mark.parametrize("text", [
    "", "now", "2023-11-14", "2023-11-14T22:13", "2023-13-01T00:00:00Z", "2023-11-14T25:00:00Z",
    "2023-11-14T22:13:20+1", "2023-11-14T22:13:20 UTC", "14/11/2023 22:13:20", "1700000000123",
])
def test_parse_iso_ms_refuses_what_is_not_iso(text: str) -> None:
    with pytest.raises(ValueError):
        parse_iso_ms(text)


def test_sqlite_decodes_epoch_ms_written_as_a_number() -> None:
    assert DIALECTS["sqlite"].decode_ts(1_700_000_000_123) == 1_700_000_000_123


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=MAX_TIMESTAMP_MS), min_size=1, max_size=20))
def test_sqlite_text_round_trips_and_sorts_like_the_numbers(stamps: list) -> None:
    encode, decode = DIALECTS["sqlite"].encode_ts, DIALECTS["sqlite"].decode_ts
    texts = [encode(ms) for ms in stamps]
    assert all(len(t) == 24 and t.endswith("Z") and t[10] == "T" for t in texts)
    assert [decode(t) for t in texts] == stamps
    assert sorted(texts) == [encode(ms) for ms in sorted(stamps)]  # text order == time order


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=MAX_TIMESTAMP_MS))
def test_server_timestamps_round_trip(ms: int) -> None:
    for name in ("postgres", "mysql"):
        d: Dialect = DIALECTS[name]
        assert d.decode_ts(d.encode_ts(ms)) == ms


# -- JSON values through the mappers ----------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_any_json_value_round_trips_through_every_mapper(value: Any) -> None:
    for name in DIALECTS:
        threads = mapper(name, "memoryThreads")
        got = threads.from_row(threads.to_row("t1", thread(state=value)))
        assert got["state"] == value
        runs = mapper(name, "runs")
        rec = {"runId": "r1", "agentName": "a", "status": "running", "config": value,
               "startedAt": 1, "updatedAt": 2}
        assert runs.from_row(runs.to_row("r1", rec))["config"] == value


@settings(max_examples=100, deadline=None)
@given(JSON, st.text(max_size=5), st.text(max_size=5))
def test_a_nul_anywhere_in_json_is_refused(value: Any, before: str, after: str) -> None:
    poisoned = [value, {"k": before + "\x00" + after}]
    with pytest.raises(RecordError, match="memoryThreads.state.*NUL"):
        mapper("postgres", "memoryThreads").to_row("t1", thread(state=poisoned))
