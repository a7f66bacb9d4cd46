"""create_tables / drop_tables / check_schema ("Physical schema", "Encodings" in docs/contract.md),
users' own tables, and the databases `peewee_storage` accepts (plain, pooled, *Ext, proxies; several
dialects in one process)."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import peewee
import pytest
from playhouse.migrate import SchemaMigrator, migrate
from playhouse.pool import (
    PooledMySQLDatabase,
    PooledPostgresqlDatabase,
    PooledSqliteDatabase,
)
from playhouse.postgres_ext import PooledPostgresqlExtDatabase, PostgresqlExtDatabase

from better_agent_peewee import (
    ConflictError,
    DialectError,
    NotFoundError,
    check_schema,
    create_tables,
    drop_tables,
    peewee_storage,
)
from better_agent_peewee.models import PERFORMANCE_INDEXES
from better_agent_peewee.schema import drop_performance_indexes
from tests import test_storage as contract
from tests.conftest import close_database
from tests.samples import (
    PHYSICAL_TABLES,
    SAMPLES,
    T0,
    expected_read,
    fresh,
    message,
    message_key,
    run,
    seed_parents,
    sql,
    thread,
)

# -- what "Physical schema" says, as data -----------------------------------------------------

# table -> [(column, kind, nullable)] in the contract's order; kinds: key, text, json, ts, int.
COLUMNS: Dict[str, List[Tuple[str, str, bool]]] = {
    "threads": [("id", "key", False), ("agent_name", "key", True), ("scope", "key", True),
                ("title", "text", True), ("state", "json", True), ("metadata", "json", True),
                ("created_at", "ts", False), ("updated_at", "ts", False)],
    "messages": [("id", "key", False), ("thread_id", "key", False), ("run_id", "key", True),
                 ("message", "json", False), ("created_at", "ts", False)],
    "agent_runs": [("run_id", "key", False), ("agent_name", "key", False), ("thread_id", "key", True),
                   ("scope", "key", True), ("status", "key", False), ("abort_requested_at", "ts", True),
                   ("final_event", "json", True), ("config", "json", True), ("started_at", "ts", False),
                   ("updated_at", "ts", False), ("finished_at", "ts", True)],
    "streams": [("id", "key", False), ("run_id", "key", False), ("status", "key", False),
                ("created_at", "ts", False), ("updated_at", "ts", False), ("closed_at", "ts", True)],
    "stream_events": [("id", "key", False), ("run_id", "key", False), ("seq", "int", False),
                      ("timestamp", "ts", False), ("event", "json", False)],
}
PRIMARY_KEYS = {"threads": ["id"], "messages": ["id"], "agent_runs": [], "streams": ["id"],
                "stream_events": ["id"]}
# (table, name or None for "any name", columns, unique)
INDEXES = [
    ("threads", "threads_agent_name_scope_idx", ["agent_name", "scope"], False),
    ("messages", "messages_thread_id_idx", ["thread_id"], False),
    ("agent_runs", None, ["run_id"], True),
    ("agent_runs", "agent_runs_run_id_scope_idx", ["run_id", "scope"], False),
    ("streams", None, ["run_id"], True),
    ("stream_events", "stream_events_run_id_idx", ["run_id"], False),
    ("stream_events", "stream_events_run_id_seq_unique", ["run_id", "seq"], True),
]
TYPES = {  # full column type per dialect and kind (MariaDB's JSON is LONGTEXT with a JSON_VALID check)
    "sqlite": {"key": {"TEXT"}, "text": {"TEXT"}, "json": {"TEXT"}, "ts": {"TEXT"}, "int": {"INTEGER"}},
    "postgres": {"key": {"text"}, "text": {"text"}, "json": {"jsonb"}, "ts": {"timestamp with time zone"},
                 "int": {"integer"}},
    "mysql": {"key": {"varchar(255)"}, "text": {"longtext"}, "json": {"longtext", "json"},
              "ts": {"datetime(3)"}, "int": {"int(11)", "int"}},
}

# "Physical schema" as a user's own PostgreSQL migration would write it.
POSTGRES_DDL = """
CREATE TABLE threads (
  id text PRIMARY KEY,
  agent_name text,
  scope text,
  title text,
  state jsonb,
  metadata jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX threads_agent_name_scope_idx ON threads (agent_name, scope);
CREATE TABLE messages (
  id text PRIMARY KEY,
  thread_id text NOT NULL REFERENCES threads(id),
  run_id text,
  message jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_thread_id_idx ON messages (thread_id);
CREATE TABLE agent_runs (
  run_id text NOT NULL UNIQUE,
  agent_name text NOT NULL,
  thread_id text,
  scope text,
  status text NOT NULL,
  abort_requested_at timestamptz,
  final_event jsonb,
  config jsonb,
  started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz
);
CREATE INDEX agent_runs_run_id_scope_idx ON agent_runs (run_id, scope);
CREATE TABLE streams (
  id text PRIMARY KEY,
  run_id text NOT NULL UNIQUE,
  status text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  closed_at timestamptz
);
CREATE TABLE stream_events (
  id text PRIMARY KEY,
  run_id text NOT NULL,
  seq integer NOT NULL,
  timestamp timestamptz NOT NULL DEFAULT now(),
  event jsonb NOT NULL
);
CREATE INDEX stream_events_run_id_idx ON stream_events (run_id);
CREATE UNIQUE INDEX stream_events_run_id_seq_unique ON stream_events (run_id, seq);
"""


def run_script(database: peewee.Database, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            database.execute_sql(statement)


def describe(database: peewee.Database) -> Dict[str, Any]:
    """Everything introspection says about the five tables, for comparing two states."""
    out: Dict[str, Any] = {"tables": sorted(database.get_tables())}
    for table in PHYSICAL_TABLES:
        if table in out["tables"]:
            out[table] = (
                [(c.name, c.full_type.lower(), c.null) for c in database.get_columns(table)],
                sorted((ix.name, tuple(ix.columns), bool(ix.unique)) for ix in database.get_indexes(table)),
                sorted(database.get_primary_keys(table)),
                sorted((fk.column, fk.dest_table, fk.dest_column) for fk in database.get_foreign_keys(table)),
            )
    return out


def assert_contract_schema(database: peewee.Database, dialect: str) -> None:
    """The five tables are exactly "Physical schema": columns, types, nullability, keys, indexes, the FK."""
    assert sorted(database.get_tables()) == sorted(PHYSICAL_TABLES)
    for table, columns in COLUMNS.items():
        found = database.get_columns(table)
        assert [c.name for c in found] == [name for name, _, _ in columns], table
        for col, (name, kind, nullable) in zip(found, columns):  # same length: names compared above
            assert col.null is nullable, f"{table}.{name} nullable should be {nullable}"
            assert col.full_type in TYPES[dialect][kind], f"{table}.{name}: {col.full_type}"
        assert sorted(database.get_primary_keys(table)) == PRIMARY_KEYS[table], table
    for table, index, indexed, unique in INDEXES:
        matching = [ix for ix in database.get_indexes(table)
                    if ix.columns == indexed and bool(ix.unique) == unique]
        assert matching, f"no {'unique ' if unique else ''}index on {table}{indexed}"
        if index is not None:
            assert index in [ix.name for ix in matching]
    fks = [(fk.table, fk.column, fk.dest_table, fk.dest_column)
           for t in PHYSICAL_TABLES for fk in database.get_foreign_keys(t)]
    assert fks == [("messages", "thread_id", "threads", "id")]


def migrator(database: peewee.Database) -> SchemaMigrator:
    return SchemaMigrator.from_database(database)


# -- create / drop / check ------------------------------------------------------------------

def test_create_tables_builds_the_contract_schema(database: peewee.Database, dialect: str) -> None:
    create_tables(database)
    assert_contract_schema(database, dialect)
    assert check_schema(database) == []


def test_create_tables_is_idempotent_and_keeps_rows(database: peewee.Database, dialect: str) -> None:
    create_tables(database)
    shape = describe(database)
    storage = peewee_storage(database)
    storage.set("memoryThreads", "t1", thread())
    create_tables(database)
    create_tables(database)
    assert describe(database) == shape
    assert storage.get("memoryThreads", "t1") == thread()
    # A partly created schema is completed, not duplicated.
    sql(database, "DROP TABLE stream_events")
    create_tables(database)
    assert describe(database) == shape
    assert storage.get("memoryThreads", "t1") == thread()


def test_drop_tables(database: peewee.Database) -> None:
    create_tables(database)
    sql(database, "CREATE TABLE someone_elses (id INTEGER)")
    drop_tables(database)
    assert database.get_tables() == ["someone_elses"]
    drop_tables(database)  # nothing left to drop: fine
    create_tables(database)
    assert check_schema(database) == []


def test_server_side_defaults_are_now_in_utc(database: peewee.Database, dialect: str) -> None:
    """A row written without timestamps (e.g. by hand) gets `now` and reads back as epoch ms."""
    create_tables(database)
    storage = peewee_storage(database)
    before = int(time.time() * 1000)
    sql(database, "INSERT INTO threads (id, agent_name) VALUES (?, ?)", ["t1", "agent"])
    got = storage.get("memoryThreads", "t1")
    assert got["createdAt"] == got["updatedAt"]
    # Generous bounds: the server clock and ours agree to within a minute (UTC both sides).
    assert before - 60_000 <= got["createdAt"] <= int(time.time() * 1000) + 60_000
    if dialect == "sqlite":
        (text,) = sql(database, "SELECT created_at FROM threads")[0]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)


def test_check_schema_names_what_is_missing(database: peewee.Database) -> None:
    assert sorted(check_schema(database)) == sorted(f"missing table {t}" for t in PHYSICAL_TABLES)
    create_tables(database)
    # (Without our performance indexes: SQLite refuses to drop a column an index uses.)
    assert len(drop_performance_indexes(database)) == len(PERFORMANCE_INDEXES)
    migrate(migrator(database).drop_index("threads", "threads_agent_name_scope_idx"))
    problems = check_schema(database)
    assert len(problems) == 1 and "threads_agent_name_scope_idx" in problems[0] and "missing" in problems[0]

    migrate(migrator(database).drop_column("agent_runs", "finished_at"))
    problems = check_schema(database)
    assert any("agent_runs.finished_at" in p and "missing" in p for p in problems), problems
    assert len(problems) == 2

    migrate(migrator(database).add_not_null("threads", "title"))
    problems = check_schema(database)
    assert any("threads.title" in p and "nullable" in p for p in problems), problems

    sql(database, "DROP TABLE stream_events")
    problems = check_schema(database)
    assert "missing table stream_events" in problems
    assert not any("stream_events_" in p for p in problems)  # its indexes are not reported twice
    assert len(problems) == 4, problems


def test_check_schema_accepts_extra_columns_with_defaults(database: peewee.Database) -> None:
    """Extra nullable columns are fine (a user's migration may add them); NOT NULL without default is not."""
    create_tables(database)
    sql(database, "ALTER TABLE threads ADD COLUMN note TEXT")
    assert check_schema(database) == []
    storage = peewee_storage(database)
    storage.set("memoryThreads", "t1", thread())
    assert storage.get("memoryThreads", "t1") == thread()
    sql(database, "ALTER TABLE threads ADD COLUMN tenant INTEGER NOT NULL DEFAULT 0")
    assert check_schema(database) == []
    storage.set("memoryThreads", "t2", thread("t2"))


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres),
                                     pytest.param("mysql", marks=pytest.mark.mysql)], indirect=True)
def test_check_schema_reports_an_extra_not_null_column(database: peewee.Database) -> None:
    """(SQLite cannot add a NOT NULL column without a default at all.)"""
    create_tables(database)
    sql(database, "ALTER TABLE agent_runs ADD COLUMN owner VARCHAR(20) NOT NULL")
    problems = check_schema(database)
    assert len(problems) == 1 and "agent_runs.owner" in problems[0], problems


# -- users' own tables: "Physical schema" in raw PostgreSQL DDL -------------------------------

OWN_MIGRATION_CASES = [
    pytest.param(contract.test_set_get_list_delete_round_trip, {"table": t}, id=f"round-trip-{t}")
    for t in SAMPLES
] + [
    pytest.param(contract.test_set_is_a_full_replace, {"table": "runs"}, id="full-replace-runs"),
    pytest.param(contract.test_set_is_a_full_replace, {"table": "memoryMessages"},
                 id="full-replace-messages"),
    pytest.param(contract.test_absent_optional_field_is_a_null_column_both_ways, {"table": "memoryThreads"},
                 id="null-columns-threads"),
    pytest.param(contract.test_run_config_is_always_present, {}, id="config-present"),
    pytest.param(contract.test_empty_string_is_a_value_not_an_absence, {}, id="empty-string"),
    pytest.param(contract.test_list_where_order_by_take, {}, id="list"),
    pytest.param(contract.test_multi_field_order_by_applies_in_dict_order, {}, id="multi-order"),
    pytest.param(contract.test_nulls_last_on_threads_scope, {}, id="nulls-last"),
    pytest.param(contract.test_timestamp_fields_compare_and_order_as_epoch_ms, {}, id="timestamps"),
    pytest.param(contract.test_exact_millisecond_round_trip, {"ms": 1_700_000_000_123, "dialect": "postgres"},
                 id="milliseconds"),
    pytest.param(contract.test_every_json_kind_round_trips, {"value": "top-level string"}, id="json-string"),
    pytest.param(contract.test_every_json_kind_round_trips, {"value": [1, None, {"a": []}]}, id="json-array"),
    pytest.param(contract.test_every_json_kind_round_trips, {"value": None}, id="json-null"),
    pytest.param(contract.test_one_statement_per_verb, {"table": "streamEvents"}, id="one-statement"),
    pytest.param(contract.test_ids_differing_only_in_case_are_two_records, {}, id="case-sensitive-ids"),
]


@pytest.fixture
def user_tables(database: peewee.Database) -> peewee.Database:
    """The database with the five tables made by the user's raw DDL, not by create_tables."""
    run_script(database, POSTGRES_DDL)
    return database


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
@pytest.mark.parametrize("with_our_indexes", [False, True], ids=["shared-indexes", "plus-ours"])
@pytest.mark.parametrize("case, kwargs", OWN_MIGRATION_CASES)
def test_contract_on_tables_made_by_raw_postgres_ddl(user_tables: peewee.Database, with_our_indexes: bool,
                                                     case: Callable[..., None],
                                                     kwargs: Dict[str, Any]) -> None:
    if with_our_indexes:
        assert sorted(create_tables(user_tables)) == sorted(PERFORMANCE_INDEXES)
    case(peewee_storage(user_tables), **kwargs)


def raw_rows(database: peewee.Database) -> Dict[str, List[Tuple[Any, ...]]]:
    """Every row of the five tables as the driver returns it, in key order."""
    return {t: sorted(database.execute_sql(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in PHYSICAL_TABLES}


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
@pytest.mark.parametrize("concurrently", [False, True])
def test_init_adds_our_indexes_to_tables_made_by_raw_ddl_and_rows_stay_the_same(
        user_tables: peewee.Database, concurrently: bool) -> None:
    """A database made by the TypeScript adapters' migrations gets our indexes from create_tables
    (CONCURRENTLY or not): the rows are untouched and read and write as before."""
    storage = peewee_storage(user_tables)
    seed_parents(storage)
    for table, sample in SAMPLES.items():
        storage.set(table, sample.key, fresh(sample.full))
    before = raw_rows(user_tables)
    report = check_schema(user_tables)
    assert report == [] and len(report.advice) == len(PERFORMANCE_INDEXES), report.advice
    assert all("better-agent-peewee init" in a for a in report.advice)

    assert sorted(create_tables(user_tables, concurrently=concurrently)) == sorted(PERFORMANCE_INDEXES)
    assert create_tables(user_tables, concurrently=concurrently) == []  # idempotent
    report = check_schema(user_tables)
    assert report == [] and report.advice == []
    assert raw_rows(user_tables) == before
    for table, sample in SAMPLES.items():
        assert storage.get(table, sample.key) == expected_read(table, sample.full)
    # Dropping ours hands back the shared schema exactly (as the TypeScript migrations make it).
    assert sorted(drop_performance_indexes(user_tables)) == sorted(PERFORMANCE_INDEXES)
    assert_contract_schema(user_tables, "postgres")
    assert raw_rows(user_tables) == before


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
def test_an_invalid_index_left_by_an_interrupted_concurrent_build_is_rebuilt(
        user_tables: peewee.Database) -> None:
    """CREATE INDEX CONCURRENTLY that fails leaves an INVALID index behind; init replaces it."""
    peewee_storage(user_tables).set("runs", "r1", fresh(SAMPLES["runs"].full))
    # A unique index on a column with duplicates fails part-way and stays, invalid, under our name.
    user_tables.execute_sql("INSERT INTO agent_runs (run_id, agent_name, status, finished_at) "
                            "VALUES ('r2', 'a', 's', '2024-01-01Z')")
    user_tables.execute_sql("INSERT INTO agent_runs (run_id, agent_name, status, finished_at) "
                            "VALUES ('r3', 'a', 's', '2024-01-01Z')")
    with pytest.raises(peewee.IntegrityError):
        user_tables.execute_sql("CREATE UNIQUE INDEX CONCURRENTLY bap_agent_runs_status_finished_idx "
                                "ON agent_runs (status, finished_at)")
    assert "bap_agent_runs_status_finished_idx" in {ix.name for ix in user_tables.get_indexes("agent_runs")}
    assert "bap_agent_runs_status_finished_idx" in sorted(create_tables(user_tables, concurrently=True))
    (valid,) = user_tables.execute_sql(
        "SELECT indisvalid FROM pg_index "
        "WHERE indexrelid = 'bap_agent_runs_status_finished_idx'::regclass").fetchone()
    assert valid is True
    assert check_schema(user_tables).advice == []


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
def test_raw_postgres_ddl_is_the_contract_schema(user_tables: peewee.Database) -> None:
    assert_contract_schema(user_tables, "postgres")
    assert check_schema(user_tables) == []
    storage = peewee_storage(user_tables)
    seed_parents(storage)
    rec = message(thread_id="ghost")
    with pytest.raises(NotFoundError, match="ghost"):
        storage.set("memoryMessages", message_key(rec), rec)
    rec = message()
    storage.set("memoryMessages", message_key(rec), rec)
    with pytest.raises(ConflictError, match="t1"):
        storage.delete("memoryThreads", "t1")
    assert storage.get("memoryMessages", message_key(rec)) == rec


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
@pytest.mark.parametrize("change, said", [
    (("thread_id text NOT NULL REFERENCES threads(id)", "thread_id text NOT NULL"),
     "foreign key messages.thread_id"),
    # run_id as primary key is the accepted second form (servers that require one); another key is not.
    (("run_id text NOT NULL UNIQUE,\n  agent_name text NOT NULL",
      "run_id text NOT NULL UNIQUE,\n  agent_name text PRIMARY KEY"),
     "agent_runs primary key"),
    (("CREATE INDEX messages_thread_id_idx", "CREATE INDEX my_own_name"), "messages_thread_id_idx"),
    (("CREATE UNIQUE INDEX stream_events_run_id_seq_unique", "CREATE INDEX stream_events_run_id_seq_unique"),
     "stream_events_run_id_seq_unique"),
    (("  status text NOT NULL,\n  created_at", "  status text,\n  created_at"), "streams.status"),
])
def test_check_schema_on_a_user_migration_that_differs(database: peewee.Database, change: Tuple[str, str],
                                                       said: str) -> None:
    assert change[0] in POSTGRES_DDL
    run_script(database, POSTGRES_DDL.replace(*change))
    problems = check_schema(database)
    assert len(problems) == 1 and said in problems[0], problems


# -- MySQL / MariaDB specifics ----------------------------------------------------------------

@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_mysql_tables_are_utf8mb4_bin_datetime3_varchar255(database: peewee.Database) -> None:
    create_tables(database)
    name = database.database
    tables = sql(database, "SELECT table_name, table_collation, engine FROM information_schema.tables "
                           "WHERE table_schema = ?", [name])
    assert sorted(tables) == sorted((t, "utf8mb4_bin", "InnoDB") for t in PHYSICAL_TABLES)
    rows = sql(database, "SELECT table_name, column_name, column_type, character_set_name, collation_name "
                         "FROM information_schema.columns WHERE table_schema = ?", [name])
    kinds = {(t, c): k for t, cols in COLUMNS.items() for c, k, _ in cols}
    assert {(t, c) for t, c, *_ in rows} == set(kinds)
    for table, column, column_type, charset, collation in rows:
        kind = kinds[(table, column)]
        if kind == "ts":
            assert column_type == "datetime(3)", (table, column)
        elif kind == "key":
            assert column_type == "varchar(255)", (table, column)
        if kind in ("key", "text", "json"):
            assert (charset, collation) == ("utf8mb4", "utf8mb4_bin"), (table, column)


@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_mysql_ids_are_case_sensitive_in_a_case_insensitive_database(server: Any, tmp_path: Path) -> None:
    """The tables carry their own collation: a database whose default is case-insensitive does not leak in."""
    other = "bap_ci_test"
    server.admin_execute(f"DROP DATABASE IF EXISTS `{other}`")
    server.admin_execute(f"CREATE DATABASE `{other}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    for host in ("127.0.0.1", "localhost"):
        server.admin_execute(f"GRANT ALL PRIVILEGES ON `{other}`.* TO %s@%s", (server.user, host))
    params = server.connect_kwargs(other)
    db = peewee.MySQLDatabase(params.pop("database"), **params)
    try:
        assert sql(db, "SELECT 'Run1' = 'run1'") == [(1,)]  # the database default ignores case
        create_tables(db)
        storage = peewee_storage(db)
        storage.set("runs", "Run1", run("Run1"))
        storage.set("runs", "run1", run("run1", status="failed"))
        storage.set("memoryThreads", "T", thread("T"))
        storage.set("memoryThreads", "t", thread("t", title="lower"))
        assert storage.get("runs", "Run1")["status"] == "running"
        assert storage.get("runs", "run1")["status"] == "failed"
        assert storage.get("memoryThreads", "T") == thread("T")
        assert [r["runId"] for r in storage.list("runs", {"where": {"runId": "RUN1"}})["items"]] == []
        assert len(storage.list("runs")["items"]) == 2
    finally:
        close_database(db)
        server.admin_execute(f"DROP DATABASE IF EXISTS `{other}`")


@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_mariadb_is_detected(database: peewee.Database) -> None:
    """MariaDB is the server without CAST(... AS JSON): the dialect must know it is there."""
    storage = peewee_storage(database)
    try:
        sql(database, "SELECT CAST('[1]' AS JSON)")
        has_json_cast = True
    except peewee.DatabaseError:
        has_json_cast = False
    assert storage.dialect.is_mariadb is (not has_json_cast)
    assert storage.dialect.is_mariadb  # the test servers are MariaDB


# -- the databases peewee_storage accepts ----------------------------------------------------

def exercise(storage: Any) -> None:
    """A few verbs on every table, enough to show the storage works on this database object."""
    seed_parents(storage)
    for table, sample in SAMPLES.items():
        storage.set(table, sample.key, fresh(sample.full))
        assert storage.get(table, sample.key) == expected_read(table, sample.full)
        assert storage.list(table, {"take": 5})["items"]
    rec = message(thread_id="ghost")
    with pytest.raises(NotFoundError):
        storage.set("memoryMessages", message_key(rec), rec)


DATABASE_CLASSES = [
    pytest.param("sqlite", cls, marks=pytest.mark.sqlite, id=f"sqlite-{cls.__name__}")
    for cls in (peewee.SqliteDatabase, PooledSqliteDatabase)
] + [
    pytest.param("postgres", cls, marks=pytest.mark.postgres, id=f"postgres-{cls.__name__}")
    for cls in (peewee.PostgresqlDatabase, PooledPostgresqlDatabase, PostgresqlExtDatabase,
                PooledPostgresqlExtDatabase)
] + [
    pytest.param("mysql", cls, marks=pytest.mark.mysql, id=f"mysql-{cls.__name__}")
    for cls in (peewee.MySQLDatabase, PooledMySQLDatabase)
]


@pytest.mark.parametrize("dialect, cls", DATABASE_CLASSES, indirect=["dialect"])
def test_storage_on_every_kind_of_database(make_database: Callable[..., peewee.Database], dialect: str,
                                           cls: type) -> None:
    # A pool hands a connection between threads, which sqlite3 allows only when told so.
    db = make_database(cls, **({"check_same_thread": False} if cls is PooledSqliteDatabase else {}))
    create_tables(db)
    storage = peewee_storage(db)
    assert storage.dialect.name == dialect
    assert storage.database is db
    exercise(storage)

    # Another OS thread gets its own (or a pooled) connection, with the same guarantees.
    outcome: List[Any] = []

    def work() -> None:
        try:
            rec = message("m2", thread_id="ghost")
            storage.set("memoryMessages", message_key(rec), rec)
            outcome.append("written")
        except Exception as exc:
            outcome.append(exc)
        finally:
            db.close()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert isinstance(outcome[0], NotFoundError), outcome


def test_storage_through_a_database_proxy(database: peewee.Database, dialect: str) -> None:
    proxy = peewee.DatabaseProxy()
    with pytest.raises(DialectError, match="not initialised"):
        peewee_storage(proxy)
    with pytest.raises(DialectError, match="not initialised"):
        create_tables(proxy)
    proxy.initialize(database)
    create_tables(proxy)
    storage = peewee_storage(proxy)
    assert storage.database is database
    assert storage.dialect.name == dialect
    exercise(storage)
    assert check_schema(proxy) == []
    drop_tables(proxy)
    assert database.get_tables() == []


@pytest.mark.parametrize("name",
                         ["sqlite", "postgres", "mysql", "postgresql", "mariadb", "sqlite3", "PostgreSQL"])
def test_explicit_dialect_must_match_the_database(database: peewee.Database, dialect: str, name: str) -> None:
    aliases = {"postgresql": "postgres", "mariadb": "mysql", "sqlite3": "sqlite"}
    if aliases.get(name.lower(), name.lower()) == dialect:
        assert peewee_storage(database, dialect=name).dialect.name == dialect
    else:
        with pytest.raises(DialectError) as info:
            peewee_storage(database, dialect=name)
        assert repr(name) in str(info.value) and type(database).__name__ in str(info.value)


def test_unknown_dialect_or_database_is_refused(database: peewee.Database) -> None:
    with pytest.raises(DialectError, match="'oracle'"):
        peewee_storage(database, dialect="oracle")
    with pytest.raises(DialectError, match="str"):
        peewee_storage("sqlite:///x.db")


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres),
                                     pytest.param("mysql", marks=pytest.mark.mysql)], indirect=True)
def test_two_storages_on_two_dialects_in_one_process(database: peewee.Database, dialect: str,
                                                     tmp_path: Path) -> None:
    """Each storage has its own model classes: a JSON column means jsonb on one and text on the other."""
    lite_db = peewee.SqliteDatabase(str(tmp_path / "side.db"))
    try:
        create_tables(lite_db)
        create_tables(database)
        lite, server = peewee_storage(lite_db), peewee_storage(database)
        assert (lite.dialect.name, server.dialect.name) == ("sqlite", dialect)
        assert lite.models.thread is not server.models.thread
        for i, value in enumerate(["top-level string", [1, "a"], None, {"k": "v"}, 7]):
            for storage, where in ((lite, "lite"), (server, "server")):  # alternate, call by call
                storage.set("memoryThreads", f"t{i}", thread(f"t{i}", state=value, title=where))
                storage.set("runs", f"r{i}", run(f"r{i}", config=value, startedAt=T0 + i))
        for storage, where in ((server, "server"), (lite, "lite")):
            for i, value in enumerate(["top-level string", [1, "a"], None, {"k": "v"}, 7]):
                got = storage.get("memoryThreads", f"t{i}")
                assert got["state"] == value and got["title"] == where
                assert storage.get("runs", f"r{i}")["config"] == value
            assert [r["runId"] for r in
                    storage.list("runs", {"orderBy": {"startedAt": "desc"}, "take": 2})["items"]] \
                == ["r4", "r3"]
            # The models work for plain peewee queries too, each with its own dialect's JSON.
            Thread = storage.models.thread
            states = {t.id: t.state for t in Thread.select().order_by(Thread.id)}
            assert states["t0"] == "top-level string" and states["t1"] == [1, "a"] \
                and states["t3"] == {"k": "v"}
            assert Thread.select().where(Thread.title == where).count() == 5
    finally:
        close_database(lite_db)


@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_check_schema_reports_case_insensitive_key_columns_and_the_fix_works(
        database: peewee.Database) -> None:
    """Tables made with the server's default collation: `Run1` and `run1` would be one key."""
    create_tables(database)
    assert check_schema(database) == []
    sql(database, "ALTER TABLE agent_runs CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    problems = check_schema(database)
    assert len(problems) == 1, problems
    assert problems[0].startswith("table agent_runs has key columns whose collation is case-insensitive")
    assert "run_id (utf8mb4_general_ci)" in problems[0] and "status (utf8mb4_general_ci)" in problems[0]
    storage = peewee_storage(database)
    storage.set("runs", "Run1", run("Run1"))
    storage.set("runs", "run1", run("run1", status="failed"))
    # The upsert of run1 overwrote Run1, and reading run1 finds Run1: what the check warns of.
    assert storage.get("runs", "Run1")["status"] == "failed"
    assert storage.get("runs", "run1")["runId"] == "Run1"
    storage.delete("runs", "Run1")
    fix = problems[0].split("Fix with: ")[1]
    sql(database, fix)
    assert check_schema(database) == []
    storage.set("runs", "Run1", run("Run1"))
    storage.set("runs", "run1", run("run1", status="failed"))
    assert storage.get("runs", "Run1") == expected_read("runs", run("Run1"))
