"""The four verbs ("The interface", "Records" in docs/contract.md) on every table, on every dialect."""
from __future__ import annotations

import datetime as dt
from typing import Any, Dict, Iterator, List

import peewee
import pytest

from better_agent_peewee import RecordError, UnsupportedTableError, peewee_storage
from better_agent_peewee.records import TABLES
from better_agent_peewee.timestamps import MAX_TIMESTAMP_MS
from tests.conftest import close_database
from tests.samples import (
    DIALECT_PARAMS,
    SAMPLES,
    T0,
    TABLE_NAMES,
    counting,
    event,
    expected_read,
    fresh,
    key_of,
    message,
    message_key,
    module_database,
    run,
    seed_parents,
    sql,
    stream,
    thread,
    wipe,
)


@pytest.fixture(scope="module", params=DIALECT_PARAMS)
def dialect(request: pytest.FixtureRequest) -> str:
    """Module-scoped here: the tests of one dialect share one set of tables (emptied per test)."""
    return request.param


@pytest.fixture(scope="module")
def tables(request: pytest.FixtureRequest, dialect: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[peewee.Database]:
    yield from module_database(request, dialect, tmp_path_factory)


@pytest.fixture
def storage(tables: peewee.Database) -> Iterator[Any]:
    """A storage over the module's tables, empty at test start, on a fresh connection."""
    wipe(tables)
    yield peewee_storage(tables)
    close_database(tables)  # session settings (e.g. a time zone) do not leak into the next test


def put(storage: Any, table: str, rec: Dict[str, Any]) -> None:
    storage.set(table, key_of(table, rec), rec)


def items(storage: Any, table: str, query: Any = None) -> List[Dict[str, Any]]:
    result = storage.list(table, query)
    assert set(result) == {"items"}
    return result["items"]


def ids(storage: Any, table: str, query: Any = None, field: str = "id") -> List[str]:
    return [r[field] for r in items(storage, table, query)]


def prepare(storage: Any, table: str) -> None:
    """The parent thread a sample message needs (only for the messages table)."""
    if table == "memoryMessages":
        seed_parents(storage)


def raw_column(storage: Any, table: str, column: str) -> List[Any]:
    physical = SAMPLES[table].physical
    return [r[0] for r in sql(storage.database, f"SELECT {column} FROM {physical}")]


# -- set / get / delete ------------------------------------------------------------------

@pytest.mark.parametrize("table", TABLE_NAMES)
def test_set_get_list_delete_round_trip(storage: Any, table: str) -> None:
    sample = SAMPLES[table]
    prepare(storage, table)
    assert storage.get(table, sample.key) is None

    storage.set(table, sample.key, fresh(sample.minimal))
    assert storage.get(table, sample.key) == expected_read(table, sample.minimal)
    assert items(storage, table) == [expected_read(table, sample.minimal)]

    storage.set(table, sample.key, fresh(sample.full))
    assert storage.get(table, sample.key) == expected_read(table, sample.full)
    assert items(storage, table) == [expected_read(table, sample.full)]

    storage.delete(table, sample.key)
    assert storage.get(table, sample.key) is None
    assert items(storage, table) == []


@pytest.mark.parametrize("table", TABLE_NAMES)
def test_set_is_a_full_replace(storage: Any, table: str) -> None:
    """Re-setting without the optional fields removes them: their columns go back to NULL."""
    sample = SAMPLES[table]
    prepare(storage, table)
    storage.set(table, sample.key, fresh(sample.full))
    storage.set(table, sample.key, fresh(sample.minimal))
    got = storage.get(table, sample.key)
    assert got == expected_read(table, sample.minimal)
    for field, column in sample.optional.items():
        assert field not in got
        assert raw_column(storage, table, column) == [None]
    if table == "memoryMessages":
        assert "toolCalls" not in got  # kept in the JSON column, replaced with it


@pytest.mark.parametrize("table", TABLE_NAMES)
def test_delete_absent_id_is_fine_and_touches_nothing_else(storage: Any, table: str) -> None:
    sample = SAMPLES[table]
    prepare(storage, table)
    storage.set(table, sample.key, fresh(sample.full))
    storage.delete(table, "no-such-id")
    storage.delete(table, sample.key + "x")
    assert storage.get(table, sample.key) == expected_read(table, sample.full)
    storage.delete(table, sample.key)
    storage.delete(table, sample.key)  # twice: still fine
    assert storage.get(table, sample.key) is None


@pytest.mark.parametrize("table", TABLE_NAMES)
def test_absent_optional_field_is_a_null_column_both_ways(storage: Any, table: str) -> None:
    """Absent -> NULL on write; a NULL written by someone else -> absent key on read."""
    sample = SAMPLES[table]
    prepare(storage, table)
    storage.set(table, sample.key, fresh(sample.minimal))
    for column in sample.optional.values():
        assert raw_column(storage, table, column) == [None]
    storage.set(table, sample.key, fresh(sample.full))
    for field, column in sample.optional.items():
        assert raw_column(storage, table, column) != [None]
        sql(storage.database, f"UPDATE {sample.physical} SET {column} = NULL")
        got = storage.get(table, sample.key)
        assert field not in got
        if field in TABLES[table].queryable:  # JSON fields are not filterable
            assert items(storage, table, {"where": {field: None}}) == [got]


def test_run_config_is_always_present(storage: Any) -> None:
    rec = run()
    del rec["config"]
    storage.set("runs", "r1", rec)
    assert storage.get("runs", "r1")["config"] is None
    assert raw_column(storage, "runs", "config") == [None]
    storage.set("runs", "r1", run(config={"a": 1}))
    assert storage.get("runs", "r1")["config"] == {"a": 1}
    storage.set("runs", "r1", run(config=None))
    assert storage.get("runs", "r1")["config"] is None
    assert items(storage, "runs")[0]["config"] is None


def test_empty_string_is_a_value_not_an_absence(storage: Any) -> None:
    storage.set("memoryThreads", "t1", thread(agentName="", scope="", title=""))
    storage.set("memoryThreads", "t2", thread("t2"))
    got = storage.get("memoryThreads", "t1")
    assert (got["agentName"], got["scope"], got["title"]) == ("", "", "")
    assert raw_column(storage, "memoryThreads", "title").count("") == 1
    assert ids(storage, "memoryThreads", {"where": {"scope": ""}}) == ["t1"]
    assert ids(storage, "memoryThreads", {"where": {"scope": None}}) == ["t2"]

    rec = message(content="", runId="")
    storage.set("memoryMessages", message_key(rec), rec)
    got = storage.get("memoryMessages", message_key(rec))
    assert (got["content"], got["runId"]) == ("", "")
    storage.set("runs", "r1", run(scope="", threadId=""))
    got = storage.get("runs", "r1")
    assert (got["scope"], got["threadId"]) == ("", "")


def test_get_of_an_absent_id_is_none(storage: Any) -> None:
    for table in TABLE_NAMES:
        assert storage.get(table, "absent") is None
        assert items(storage, table) == []


def test_ids_differing_only_in_case_are_two_records(storage: Any) -> None:
    """MySQL's default collations are case-insensitive; ours must not be ("Encodings" in docs/contract.md)."""
    for table, a, b in (("memoryThreads", thread("Case1"), thread("case1", title="lower")),
                        ("runs", run("Run1"), run("run1", status="failed")),
                        ("streams", stream("Run1"), stream("run1", status="closed")),
                        ("streamEvents", event("Run1"), event("run1", timestamp=T0))):
        put(storage, table, a)
        put(storage, table, b)
        assert storage.get(table, key_of(table, a)) == expected_read(table, a)
        assert storage.get(table, key_of(table, b)) == expected_read(table, b)
        storage.delete(table, key_of(table, a))
        assert storage.get(table, key_of(table, b)) == expected_read(table, b)
        put(storage, table, a)
    assert ids(storage, "runs", {"where": {"runId": "Run1"}}, "runId") == ["Run1"]
    assert ids(storage, "memoryThreads", {"orderBy": {"id": "asc"}}) == ["Case1", "case1"]


def test_unknown_table_is_unsupported(storage: Any) -> None:
    for name in ("threads", "memorythreads", "messages", "nope", "", None, 3):
        for verb, args in (("get", (name, "x")), ("set", (name, "x", {"id": "x"})), ("delete", (name, "x")),
                           ("list", (name, None)), ("list", (name,))):
            with pytest.raises(UnsupportedTableError) as info:
                getattr(storage, verb)(*args)
            assert str(info.value) == f"Storage table {name!r} is not supported"
            assert info.value.table == name


# -- list ---------------------------------------------------------------------------------

def seed_runs(storage: Any) -> None:
    rows = [
        run("r1", agentName="a", startedAt=T0 + 30, threadId="t1", status="completed", finishedAt=T0 + 40),
        run("r2", agentName="b", startedAt=T0 + 10, threadId="t1"),
        run("r3", agentName="a", startedAt=T0 + 50, scope="s1"),
        run("r4", agentName="a", startedAt=T0 + 20, threadId="t2", finishedAt=T0 + 25, status="failed"),
        run("r5", agentName="a", startedAt=T0 + 40, scope="s2", finishedAt=T0 + 45, status="aborted"),
        run("r6", agentName="b", startedAt=T0 + 40, threadId="t2", scope="s1"),
    ]
    for rec in rows:
        put(storage, "runs", rec)


def run_ids(storage: Any, query: Any) -> List[str]:
    return ids(storage, "runs", query, "runId")


def test_list_where_order_by_take(storage: Any) -> None:
    seed_runs(storage)
    assert run_ids(storage, {"where": {"agentName": "a"}, "orderBy": {"startedAt": "desc"}, "take": 2}) \
        == ["r3", "r5"]
    assert run_ids(storage, {"where": {"agentName": "a"}, "orderBy": {"startedAt": "asc"}}) \
        == ["r4", "r1", "r5", "r3"]
    assert run_ids(storage, {"where": {"threadId": "t1"}, "orderBy": {"startedAt": "desc"}, "take": 1}) \
        == ["r1"]
    # Several where fields: all must match.
    assert run_ids(storage, {"where": {"agentName": "b", "status": "running", "scope": "s1"}}) == ["r6"]
    assert run_ids(storage, {"where": {"agentName": "a", "status": "running", "scope": "s2"}}) == []
    assert sorted(run_ids(storage, None)) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert sorted(run_ids(storage, {})) == ["r1", "r2", "r3", "r4", "r5", "r6"]


def test_list_take_zero_and_take_beyond_the_end(storage: Any) -> None:
    seed_runs(storage)
    assert run_ids(storage, {"take": 0}) == []
    assert run_ids(storage, {"orderBy": {"startedAt": "asc"}, "take": 0}) == []
    assert len(run_ids(storage, {"take": 100})) == 6
    assert run_ids(storage, {"where": {"agentName": "b"}, "orderBy": {"startedAt": "asc"}, "take": 5}) \
        == ["r2", "r6"]


def test_multi_field_order_by_applies_in_dict_order(storage: Any) -> None:
    seed_runs(storage)
    assert run_ids(storage, {"orderBy": {"agentName": "asc", "startedAt": "desc"}}) \
        == ["r3", "r5", "r1", "r4", "r6", "r2"]
    assert run_ids(storage, {"orderBy": {"startedAt": "desc", "agentName": "desc"}}) \
        == ["r3", "r6", "r5", "r1", "r4", "r2"]
    assert run_ids(storage, {"orderBy": {"startedAt": "desc", "agentName": "asc"}}) \
        == ["r3", "r5", "r6", "r1", "r4", "r2"]


@pytest.mark.parametrize("field, present, missing", [
    ("threadId", ["r1", "r2", "r4", "r6"], {"r3", "r5"}),        # text column
    ("finishedAt", ["r4", "r1", "r5"], {"r2", "r3", "r6"}),      # timestamp column
])
def test_nulls_sort_last_in_both_directions(storage: Any, field: str, present: List[str],
                                            missing: set) -> None:
    seed_runs(storage)
    asc = run_ids(storage, {"orderBy": {field: "asc", "runId": "asc"}})
    desc = run_ids(storage, {"orderBy": {field: "desc", "runId": "asc"}})
    n = len(present)
    assert set(asc[n:]) == missing and set(desc[n:]) == missing
    assert asc[n:] == sorted(missing) and desc[n:] == sorted(missing)
    by_value = {r["runId"]: r.get(field) for r in items(storage, "runs")}
    assert [by_value[r] for r in asc[:n]] == sorted(by_value[r] for r in present)
    assert [by_value[r] for r in desc[:n]] == sorted((by_value[r] for r in present), reverse=True)
    # NULLs last in a second ordering field too, and under take.
    assert run_ids(storage, {"where": {"agentName": "a"},
                             "orderBy": {"agentName": "asc", "scope": "desc", "runId": "asc"},
                             "take": 3}) == ["r5", "r3", "r1"]


def test_nulls_last_on_threads_scope(storage: Any) -> None:
    for i, scope in enumerate(["b", None, "a", None, "c"]):
        extra = {} if scope is None else {"scope": scope}
        storage.set("memoryThreads", f"t{i}", thread(f"t{i}", **extra))
    assert ids(storage, "memoryThreads", {"orderBy": {"scope": "asc", "id": "asc"}}) \
        == ["t2", "t0", "t4", "t1", "t3"]
    assert ids(storage, "memoryThreads", {"orderBy": {"scope": "desc", "id": "desc"}}) \
        == ["t4", "t0", "t2", "t3", "t1"]
    assert ids(storage, "memoryThreads", {"orderBy": {"scope": "desc"}, "take": 3}) == ["t4", "t0", "t2"]


def test_where_none_matches_null_and_absent_fields(storage: Any) -> None:
    seed_runs(storage)
    assert sorted(run_ids(storage, {"where": {"threadId": None}})) == ["r3", "r5"]
    assert sorted(run_ids(storage, {"where": {"finishedAt": None, "agentName": "b"}})) == ["r2", "r6"]
    assert sorted(run_ids(storage, {"where": {"scope": None, "threadId": None}})) == []
    storage.set("memoryThreads", "t1", thread())
    storage.set("memoryThreads", "t2", thread("t2", title="x"))
    assert ids(storage, "memoryThreads", {"where": {"title": None}}) == ["t1"]


def test_timestamp_fields_compare_and_order_as_epoch_ms(storage: Any) -> None:
    stamps = [1_700_000_000_123, 5, 40, 300, 999, 1000, 86_400_000, MAX_TIMESTAMP_MS, 0]
    for i, ms in enumerate(stamps):
        storage.set("memoryThreads", f"t{i}", thread(f"t{i}", createdAt=ms, updatedAt=ms))
    got = items(storage, "memoryThreads", {"orderBy": {"createdAt": "asc"}})
    assert [r["createdAt"] for r in got] == sorted(stamps)
    got = items(storage, "memoryThreads", {"orderBy": {"updatedAt": "desc"}, "take": 3})
    assert [r["updatedAt"] for r in got] == sorted(stamps, reverse=True)[:3]
    for i, ms in enumerate(stamps):
        assert ids(storage, "memoryThreads", {"where": {"createdAt": ms}}) == [f"t{i}"]
    assert ids(storage, "memoryThreads", {"where": {"createdAt": 1_700_000_000_124}}) == []


def test_list_on_every_table_filters_by_its_own_fields(storage: Any) -> None:
    storage.set("memoryThreads", "t1", thread())
    storage.set("memoryThreads", "t2", thread("t2"))
    for i, tid in enumerate(["t1", "t2", "t1", "t1"]):
        rec = message(f"m{i}", tid, T0 + i, runId="r1" if i < 2 else "r2")
        storage.set("memoryMessages", message_key(rec), rec)
    got = items(storage, "memoryMessages", {"where": {"threadId": "t1"}, "orderBy": {"createdAt": "desc"}})
    assert [r["id"] for r in got] == ["m3", "m2", "m0"]
    assert ids(storage, "memoryMessages", {"where": {"threadId": "t1", "runId": "r1"}}) == ["m0"]
    for seq in (3, 1, 2):
        put(storage, "streamEvents", event("r1", seq))
        put(storage, "streamEvents", event("r2", seq))
    assert [r["seq"] for r in items(storage, "streamEvents",
                                    {"where": {"runId": "r1"}, "orderBy": {"seq": "asc"}})] == [1, 2, 3]
    assert ids(storage, "streamEvents", {"where": {"runId": "r2", "seq": 2}}) == ["r2:2"]
    put(storage, "streams", stream("r1"))
    put(storage, "streams", stream("r2", status="closed", closedAt=T0 + 3))
    assert ids(storage, "streams", {"where": {"status": "closed"}}, "runId") == ["r2"]
    assert ids(storage, "streams", {"orderBy": {"closedAt": "asc"}}, "runId") == ["r2", "r1"]


# -- timestamps -----------------------------------------------------------------------------

MILLISECONDS = [0, 1, 999, 1000, 1_700_000_000_123, 951_782_400_007, MAX_TIMESTAMP_MS]


def _iso(ms: int) -> str:
    return (dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ms)).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.mark.parametrize("ms", MILLISECONDS)
def test_exact_millisecond_round_trip(storage: Any, dialect: str, ms: int) -> None:
    storage.set("memoryThreads", "t1", thread(createdAt=ms, updatedAt=ms))
    storage.set("runs", "r1", run(startedAt=ms, updatedAt=ms, finishedAt=ms, abortRequestedAt=ms))
    put(storage, "streamEvents", event(timestamp=ms))
    assert storage.get("memoryThreads", "t1")["createdAt"] == ms
    got = storage.get("runs", "r1")
    assert (got["startedAt"], got["updatedAt"], got["finishedAt"], got["abortRequestedAt"]) == (ms,) * 4
    assert storage.get("streamEvents", "r1:1")["timestamp"] == ms
    assert ids(storage, "memoryThreads", {"where": {"updatedAt": ms}}) == ["t1"]

    stored = raw_column(storage, "memoryThreads", "created_at")[0]
    expected = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ms)
    if dialect == "sqlite":
        assert stored == _iso(ms)  # exactly YYYY-MM-DDTHH:MM:SS.mmmZ ("Encodings")
        assert len(stored) == 24
    elif dialect == "postgres":
        assert stored == expected.replace(tzinfo=dt.timezone.utc)
    else:
        assert stored == expected  # DATETIME(3), naive UTC


@pytest.mark.sqlite
@pytest.mark.parametrize("dialect", ["sqlite"], indirect=True)
@pytest.mark.parametrize("text, ms", [
    ("2023-11-14T22:13:20.123Z", 1_700_000_000_123),
    ("2023-11-14 22:13:20.123", 1_700_000_000_123),      # peewee / SQLite datetime(), no zone = UTC
    ("2023-11-14T22:13:20.123", 1_700_000_000_123),
    ("2023-11-14T23:13:20.123+01:00", 1_700_000_000_123),
    ("2023-11-14T17:13:20.123-0500", 1_700_000_000_123),
    ("2023-11-14 22:13:20.123456+00:00", 1_700_000_000_123),  # microseconds: truncated to ms
    ("2023-11-14T22:13:20Z", 1_700_000_000_000),
    ("2023-11-14 22:13:20", 1_700_000_000_000),
    ("2023-11-14T22:13:20.1z", 1_700_000_000_100),
])
def test_sqlite_reads_other_iso_forms(storage: Any, text: str, ms: int) -> None:
    sql(storage.database, "INSERT INTO threads (id, agent_name, created_at, updated_at) VALUES (?, ?, ?, ?)",
        ["t1", "agent", text, "2023-11-14T22:13:20.000Z"])
    assert storage.get("memoryThreads", "t1")["createdAt"] == ms
    assert items(storage, "memoryThreads")[0]["createdAt"] == ms


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
def test_postgres_session_time_zone_does_not_shift_timestamps(storage: Any) -> None:
    storage.database.connect(reuse_if_open=True)
    sql(storage.database, "SET TIME ZONE 'America/New_York'")
    storage.set("memoryThreads", "t1", thread(createdAt=1_700_000_000_123))
    assert storage.get("memoryThreads", "t1")["createdAt"] == 1_700_000_000_123
    assert ids(storage, "memoryThreads", {"where": {"createdAt": 1_700_000_000_123}}) == ["t1"]
    text = sql(storage.database,
               "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') FROM threads")[0][0]
    assert text == "2023-11-14 22:13:20.123"


# -- JSON ---------------------------------------------------------------------------------

def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = {"d": value} if i % 2 else [value]
    return value


JSON_VALUES = [
    pytest.param("plain text", id="string"),
    pytest.param("", id="empty-string"),
    pytest.param('{"looks": "like json"}', id="string-of-json"),
    pytest.param("null", id="string-null"),
    pytest.param([1, "two", None, True, {"x": []}], id="array"),
    pytest.param([], id="empty-array"),
    pytest.param({}, id="empty-object"),
    pytest.param(42, id="int"),
    pytest.param(-7, id="negative"),
    pytest.param(0, id="zero"),
    pytest.param(3.25, id="float"),
    pytest.param(0.1, id="float-0.1"),
    pytest.param(2**53, id="int-2^53"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(None, id="null"),
    pytest.param({"a": None, "b": [None, {"c": None}]}, id="nested-null"),
    pytest.param(_deep(29), id="deep-29"),  # 31 levels inside a message: MariaDB's limit
    pytest.param("héllo — 日本語 😀 𝄞 \U0001F600 مرحبا שלום \u200f\u202e end", id="unicode"),
    pytest.param({"ключ": "значение", "😀": ["𝄞"], "": "empty key"}, id="unicode-keys"),
    pytest.param('quote " backslash \\ newline \n tab \t \u2028 </script> \x01 \x7f', id="escapes"),
]


@pytest.mark.parametrize("value", JSON_VALUES)
def test_every_json_kind_round_trips(storage: Any, value: Any) -> None:
    storage.set("memoryThreads", "t1", thread(state=value, metadata={"v": value}))
    storage.set("runs", "r1", run(config=value, finalEvent={"type": "RUN_ERROR", "v": value}))
    put(storage, "streamEvents", event(event={"type": "CUSTOM", "value": value}))
    rec = message(content=value, extra={"v": value})
    storage.set("memoryMessages", message_key(rec), rec)

    got = storage.get("memoryThreads", "t1")
    assert got["state"] == value and type(got["state"]) is type(value)
    assert got["metadata"] == {"v": value}
    assert items(storage, "memoryThreads")[0] == got
    got = storage.get("runs", "r1")
    assert got["config"] == value and type(got["config"]) is type(value)
    assert got["finalEvent"] == {"type": "RUN_ERROR", "v": value}
    assert items(storage, "runs")[0] == got
    assert storage.get("streamEvents", "r1:1")["event"] == {"type": "CUSTOM", "value": value}
    got = storage.get("memoryMessages", message_key(rec))
    assert got == rec
    assert items(storage, "memoryMessages") == [rec]


def test_json_nested_deeper_than_mariadb_allows(storage: Any, dialect: str) -> None:
    """SQLite and PostgreSQL store any depth; MariaDB's JSON_VALID stops at 31 levels (MySQL at 100):
    there it is a RecordError naming the field, and nothing is written."""
    storage.set("memoryThreads", "t1", thread(state="before"))
    value = _deep(200)
    if dialect == "mysql":
        with pytest.raises(RecordError, match=r"memoryThreads\.state: .*nested too deeply"):
            storage.set("memoryThreads", "t1", thread(state=value))
        assert storage.get("memoryThreads", "t1")["state"] == "before"
        with pytest.raises(RecordError, match=r"runs\.config"):
            storage.set("runs", "r1", run(config=value))
        assert storage.get("runs", "r1") is None
    else:
        storage.set("memoryThreads", "t1", thread(state=value))
        assert storage.get("memoryThreads", "t1")["state"] == value
        storage.set("runs", "r1", run(config=value))
        assert storage.get("runs", "r1")["config"] == value


def test_sixteen_megabyte_json_value(storage: Any) -> None:
    """One 16 MiB value per dialect (no 64 KB TEXT ceiling on MySQL)."""
    big = "0123456789abcdé" * (16 * 1024 * 1024 // 15) + "😀"
    assert len(big.encode("utf-8")) > 16 * 1024 * 1024
    storage.set("memoryThreads", "t1", thread(state={"blob": big, "tail": [1, 2]}))
    got = storage.get("memoryThreads", "t1")
    assert got["state"]["tail"] == [1, 2]
    assert got["state"]["blob"] == big


# -- one statement per verb ---------------------------------------------------------------

@pytest.mark.parametrize("table", TABLE_NAMES)
def test_one_statement_per_verb(storage: Any, table: str) -> None:
    sample = SAMPLES[table]
    prepare(storage, table)
    storage.database.connect(reuse_if_open=True)
    _, ran = counting(storage.database, lambda: storage.set(table, sample.key, fresh(sample.minimal)))
    assert len(ran) == 1, ran
    assert "ON CONFLICT" in ran[0].upper() or "ON DUPLICATE KEY UPDATE" in ran[0].upper()
    _, ran = counting(storage.database, lambda: storage.set(table, sample.key, fresh(sample.full)))
    assert len(ran) == 1, ran  # a replace is the same single upsert, never read-then-write
    got, ran = counting(storage.database, lambda: storage.get(table, sample.key))
    assert got == expected_read(table, sample.full) and len(ran) == 1
    got, ran = counting(storage.database, lambda: storage.get(table, "absent"))
    assert got is None and len(ran) == 1
    field = next(iter(sample.optional), None) or "runId"
    query = {"where": {field: None}, "orderBy": {field: "desc"}, "take": 5}
    got, ran = counting(storage.database, lambda: storage.list(table, query))
    assert len(ran) == 1 and "WHERE" in ran[0].upper() and "LIMIT" in ran[0].upper()
    _, ran = counting(storage.database, lambda: storage.delete(table, sample.key))
    assert len(ran) == 1 and ran[0].upper().startswith("DELETE")
    assert storage.get(table, sample.key) is None
