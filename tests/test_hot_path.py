"""The hot-path shortcuts (docs/performance.md) behave exactly like the slow paths they skip.

`fast_execute_sql` skips peewee's per-call layers only when they would do nothing; the
row decoders (`load_text`, the SQLite timestamp reader) take a fast path for the text
this package writes and must agree with the general path on everything else.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, List

import peewee
import pytest

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.executor import fast_execute_sql
from better_agent_peewee.jsoncodec import load_text
from better_agent_peewee.timestamps import parse_iso_ms, sqlite_decode_ts
from tests.samples import T0, run

# -- JSON: the scanner fast path agrees with json.loads --------------------------------------

_SAME = ['{"a":1}', '[1,2,3]', '"text"', '123', '-1.5e3', 'true', 'null', '{"a":"\\u00e9\\ud83d\\ude00"}',
         ' {"a":1}', '{"a":1} ', '\n[1]\n', '{"a": 1, "b" : [ ]}', 'NaN', '[Infinity,-Infinity]',
         '{"k":{"k":{"k":[[[]]]}}}', '""']
_BROKEN = ['', ' ', '{"a":1} x', '{"a":1}{}', '\ufeff{"a":1}', '{"a":', "{'a':1}", '[1,]', 'nul',
           '{"a":1}\x00']


@pytest.mark.parametrize("text", _SAME)
def testload_text_decodes_like_json_loads(text: str) -> None:
    expected = json.loads(text)
    got = load_text(text)
    if isinstance(expected, list) and expected and isinstance(expected[0], float) and math.isinf(expected[0]):
        assert got == expected
    elif expected != expected:  # NaN
        assert got != got
    else:
        assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("text", _BROKEN)
def testload_text_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        load_text(text)
    assert (got.value.msg, got.value.pos) == (expected.value.msg, expected.value.pos)


def testload_text_decodes_json_nested_deeper_than_the_recursion_limit() -> None:
    depth = 100_000
    value = load_text("[" * depth + "]" * depth)
    for _ in range(depth - 1):
        value = value[0]
    assert value == []


def testload_text_passes_bytes_and_decoded_values() -> None:
    assert load_text(b'{"a":1}') == {"a": 1}
    assert load_text({"already": "decoded"}) == {"already": "decoded"}


# -- SQLite timestamps: the inlined fast path agrees with parse_iso_ms -----------------------

@pytest.mark.parametrize("text", ["1970-01-01T00:00:00.000Z", "2023-11-14T22:13:20.123Z",
                                  "9999-12-31T23:59:59.999Z", "2024-02-29T12:00:00.500Z",
                                  "2023-11-14 22:13:20.123Z", "2023-11-14T22:13:20.123",
                                  "2023-11-14T22:13:20.123+02:00", "2023-11-14T22:13:20Z",
                                  "2023-11-14T22:13:20.1234Z"])
def test_sqlite_timestamp_reader_agrees_with_parse_iso_ms(text: str) -> None:
    assert sqlite_decode_ts(text) == parse_iso_ms(text)


@pytest.mark.parametrize("text",
                         ["2023-11-14X22:13:20.123Z", "2023-13-14T22:13:20.123Z", "not a timestamp, 24 ch"])
def test_sqlite_timestamp_reader_refuses_like_parse_iso_ms(text: str) -> None:
    with pytest.raises(ValueError):
        parse_iso_ms(text)
    with pytest.raises(ValueError):
        sqlite_decode_ts(text)


# -- fast_execute_sql ------------------------------------------------------------------------

@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def test_storage_reads_and_writes_through_the_fast_path(storage: Any) -> None:
    database = storage.database
    assert storage.executor._execute_sql is not database.execute_sql  # plain peewee classes get the shortcut
    database.close()
    storage.set("runs", "r1", run("r1"))  # closed: the slow path connects (autoconnect)
    assert not database.is_closed()
    assert storage.get("runs", "r1") == run("r1")
    assert storage.list("runs", {"where": {"runId": "r1"}})["items"] == [run("r1")]


def test_driver_errors_become_peewee_errors(storage: Any) -> None:
    storage.get("runs", "warm")  # the connection is open: the fast path runs
    with pytest.raises(peewee.DatabaseError) as info:
        storage.execute("SELECT no_such_column FROM agent_runs")
    assert type(info.value).__module__ == "peewee"  # peewee's class, not the driver's
    Stream = storage.models.stream
    stamp = storage.dialect.encode_ts(T0)
    insert, _ = storage.database.get_sql_context().sql(Stream.insert(
        id="x", run_id="x", status="open", created_at=0, updated_at=0)).query()
    storage.execute(insert, ["s1", "s1", "open", stamp, stamp], idempotent=False)
    with pytest.raises(peewee.IntegrityError):
        storage.execute(insert, ["s1", "s1", "open", stamp, stamp], idempotent=False)
    assert storage.get("streams", "s1")["status"] == "open"  # and the connection still works


def test_query_hooks_still_see_every_statement(storage: Any) -> None:
    seen: List[str] = []
    storage.get("runs", "warm")
    storage.database.query_hooks.append(lambda event: seen.append(event.sql))
    try:
        storage.get("runs", "r1")
        storage.list("runs", {"take": 1})
    finally:
        storage.database.query_hooks.clear()
    assert len(seen) == 2 and "agent_runs" in seen[0]


def test_peewee_debug_log_still_shows_every_statement(storage: Any, caplog: pytest.LogCaptureFixture) -> None:
    storage.get("runs", "warm")
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        storage.get("runs", "r1")
    assert any("agent_runs" in str(record.msg) for record in caplog.records if record.name == "peewee")


def test_database_classes_that_override_execution_keep_their_own(dialect: str, make_database: Any) -> None:
    calls: List[str] = []
    base = {"sqlite": peewee.SqliteDatabase, "postgres": peewee.PostgresqlDatabase,
            "mysql": peewee.MySQLDatabase}[dialect]

    class Counting(base):  # type: ignore[misc, valid-type]
        def execute_sql(self, sql: str, params: Any = None) -> Any:
            calls.append(sql)
            return super().execute_sql(sql, params)

    database = make_database(Counting)
    assert fast_execute_sql(database) == database.execute_sql
    create_tables(database)
    storage = peewee_storage(database)
    calls.clear()
    storage.get("runs", "r1")
    storage.memory.messages.list("t1")
    assert len(calls) == 2
