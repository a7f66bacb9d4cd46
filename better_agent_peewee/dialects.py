"""Everything that differs between SQLite, PostgreSQL and MySQL/MariaDB, decided once per database.

A `Dialect` answers three questions for the rest of the package:

* which column types the five tables use ("Physical schema" and "Encodings" in docs/contract.md),
* which timestamp and JSON codecs turn record values into driver parameters and back
  (the codecs themselves live in `timestamps` and `jsoncodec`),
* how a multi-statement transaction is opened, and what a driver error means (the
  classifiers live in `driver_errors`).

Nothing outside this module asks "which database am I?": the streams, their followers and the
schema set-up ask capability flags and methods instead (`stream_row_share_lock`,
`notifies_appends`, `build_poll_sql`, `drop_index_sql`, ...).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple, Type, cast

import peewee
from playhouse.pool import PooledDatabase

from .driver_errors import (
    MYSQL_GONE,
    MYSQL_UNREACHABLE,
    PG_UNREACHABLE,
    driver_error,
    mysql_errno,
    pg_code,
    pg_gone_code,
    socket_readable,
)
from .errors import DialectError
from .jsoncodec import dumps, dumps_for_jsonb, load_native, load_text
from .timestamps import (
    MAX_TIMESTAMP_MS,
    datetime_to_ms,
    mysql_encode_ts,
    postgres_encode_ts,
    sqlite_decode_ts,
    sqlite_encode_ts,
)

logger = logging.getLogger(__name__)

__all__ = ["Dialect", "detect_dialect", "unwrap", "DIALECT_NAMES", "MAX_TIMESTAMP_MS", "DialectField",
           "TimestampField", "JSONField"]

DIALECT_NAMES = ("sqlite", "postgres", "mysql")


# -- column types -------------------------------------------------------------------------

class DialectField(peewee.Field):
    """A column whose DDL type is given verbatim by the dialect, converting nothing itself."""

    field_type = "TEXT"


class TimestampField(DialectField):
    """Epoch-ms integers in Python, the dialect's timestamp type in the database."""

    encode: Callable[[int], Any] = staticmethod(postgres_encode_ts)
    decode: Callable[[Any], int] = staticmethod(datetime_to_ms)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, peewee.Node):
            return value
        return self.encode(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else self.decode(value)


class JSONField(DialectField):
    """Any JSON value in Python, the dialect's JSON type in the database."""

    load: Callable[[Any], Any] = staticmethod(load_text)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, peewee.Node):
            return value
        return dumps(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else self.load(value)



# -- the dialects -------------------------------------------------------------------------

class Dialect:
    """Column shims, value codecs and transaction style of one database engine."""

    name = "base"
    #: MySQL table options; empty elsewhere.
    table_settings: Tuple[str, ...] = ()
    key_type = "TEXT"
    text_type = "TEXT"
    json_type = "TEXT"
    timestamp_type = "TEXT"
    now_default = ""
    #: One writer at a time for the whole database (SQLite): callers may queue their own
    #: threads for it rather than leave them to the busy timeout, which grants no turn order.
    single_writer = False

    # What the streams, their followers and the schema set-up do differently (streams.py,
    # followers.py, schema.py ask these rather than the dialect's name).
    #: The locking clause that holds the stream row shared while an event is appended, so a
    #: racing close waits; None where one writer at a time makes it needless (SQLite).
    stream_row_share_lock: Optional[str] = None
    #: Appends and closes NOTIFY the pollers of every process in the same statement, and the
    #: pollers LISTEN for it (PostgreSQL).
    notifies_appends = False
    #: The poller PREPAREs its poll statement on its connection (PostgreSQL).
    prepares_polls = False
    #: The poll statement takes three arrays (run ids, after, upto) rather than one JSON array.
    polls_with_arrays = False
    #: A timed poll first asks which streams have news, then reads each alone with constant
    #: bounds (MariaDB reads an index range only for constants).
    polls_by_checks = False
    #: PRAGMA data_version tells whether anything was committed since the last timed poll (SQLite).
    has_data_version = False
    #: The database library runs inside this process and takes process-wide locks while it works
    #: (SQLite's mutexes): a fork() must wait until the stream poller is out of its statement.
    #: (A network driver's child gets a connection of its own; the inherited one is never used.)
    fork_waits_for_statements = False
    #: CREATE INDEX CONCURRENTLY exists (outside a transaction; an interrupted build leaves an
    #: invalid index behind).
    can_build_index_concurrently = False

    encode_ts: Callable[[int], Any] = staticmethod(postgres_encode_ts)
    decode_ts: Callable[[Any], int] = staticmethod(datetime_to_ms)
    #: Decodes a JSON column as our statements select it (see `select_json`).
    load_json: Callable[[Any], Any] = staticmethod(load_text)
    #: Decodes a JSON column as the driver returns it for a plain peewee query.
    field_load_json: Callable[[Any], Any] = staticmethod(load_text)
    dump_json: Callable[[Any], str] = staticmethod(dumps)

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self._field_classes = self._make_field_classes()

    def __repr__(self) -> str:
        return f"<Dialect {self.name}>"

    # Column factories: the models call these, so the DDL of every table comes from here.
    def _make_field_classes(self) -> Dict[str, Type[peewee.Field]]:
        dialect = self

        class TimestampColumn(TimestampField):
            field_type = dialect.timestamp_type
            encode = staticmethod(dialect.encode_ts)
            decode = staticmethod(dialect.decode_ts)

        class JSONColumn(JSONField):
            field_type = dialect.json_type
            load = staticmethod(dialect.field_load_json)

        class KeyColumn(DialectField):
            field_type = dialect.key_type

        class TextColumn(DialectField):
            field_type = dialect.text_type

        return {"ts": TimestampColumn, "json": JSONColumn, "key": KeyColumn, "text": TextColumn}

    def key(self, **kwargs: Any) -> peewee.Field:
        """A key or indexed text column (VARCHAR(255) on MySQL, TEXT elsewhere)."""
        return self._field_classes["key"](**kwargs)

    def text(self, **kwargs: Any) -> peewee.Field:
        """An unindexed text column of any length."""
        return self._field_classes["text"](**kwargs)

    def integer(self, **kwargs: Any) -> peewee.Field:
        """A 32-bit integer column."""
        return peewee.IntegerField(**kwargs)

    def json(self, **kwargs: Any) -> peewee.Field:
        """A JSON column (jsonb, JSON, or JSON text on SQLite)."""
        return self._field_classes["json"](**kwargs)

    def timestamp(self, default_now: bool = False, **kwargs: Any) -> peewee.Field:
        """A UTC timestamp column; `default_now` adds the server-side DEFAULT now."""
        if default_now:
            kwargs.setdefault("constraints", []).append(peewee.SQL(f"DEFAULT {self.now_default}"))
        return self._field_classes["ts"](**kwargs)

    def select_json(self, column: peewee.Field) -> peewee.Node:
        """How our statements select a JSON column so that `load_json` can decode it."""
        return column

    def text_equals(self, column: peewee.Node, value: peewee.Node) -> peewee.Node:
        """`column = value` for a text column, exact: code point by code point, spaces included."""
        return cast(peewee.Node, column == value)

    def text_order(self, column: peewee.Node) -> peewee.Node:
        """What to ORDER BY so that a text column sorts by code point (as Python sorts str)."""
        return column

    def upsert(self, insert: Any, key: peewee.Field, others: List[Any]) -> Any:
        """`insert` turned into a single-statement upsert on `key`, replacing `others`."""
        return insert.on_conflict(conflict_target=[key], preserve=others).returning()

    # Transactions and errors.
    def transaction(self) -> ContextManager[Any]:
        """A transaction (or a savepoint when one is open) for several statements."""
        return self.database.atomic()

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        """True when `exc` is a FOREIGN KEY violation."""
        return False

    def is_transient(self, exc: BaseException) -> bool:
        """True when `exc` is a deadlock or serialization failure: the server rolled the
        transaction back and running it again may succeed."""
        return False

    def is_read_only(self, exc: BaseException) -> bool:
        """True when `exc` says the server (a standby, a replica) takes no writes."""
        return False

    def needs_new_connection(self, exc: BaseException) -> bool:
        """True when the conflict `exc` means this connection's server cannot serve now (a
        cluster node that is not synced), so a retry should reconnect (through a proxy: to
        another node)."""
        return False

    def requires_primary_key(self) -> bool:
        """True when the server refuses to create a table without a primary key."""
        return False

    def collation_problems(self, tables: List[str]) -> List[str]:
        """Key columns of `tables` whose collation would merge distinct ids, in words (with the fix)."""
        return []

    def json_param(self, node: peewee.Node) -> peewee.Node:
        """A JSON parameter where the server cannot infer its type (the SELECT list of an
        INSERT ... SELECT)."""
        return node

    def skip_duplicates(self, insert: Any) -> Any:
        """`insert` made to skip rows that would duplicate a unique key; the cursor's rowcount
        tells how many were stored. Where a dialect cannot skip only those, duplicates raise
        IntegrityError instead (callers handle both)."""
        return insert.on_conflict(action="nothing")

    def rejected_json_column(self, exc: BaseException) -> Optional[str]:
        """The JSON column whose value the server refused (too deep for it), or None."""
        return None

    def foreign_keys(self, table: str) -> List[Tuple[str, str, str]]:
        """(column, referenced table, referenced column) of each foreign key of `table`."""
        return [(fk.column, fk.dest_table, fk.dest_column) for fk in self.database.get_foreign_keys(table)]

    def prepare(self, causal_reads: bool = True) -> None:
        """Per-database settings the storage relies on (SQLite pragmas; Galera's causal reads)."""

    # Streams, followers and indexes.
    def build_poll_sql(self, models: Any) -> str:
        """The followers' poll statement over the stream tables of `models` (see followers.py).

        Every read of stream_events goes through the unique (run_id, seq) index, bounded: the last
        seq is one index entry read backwards, the events a range of it. (MariaDB and SQLite would
        otherwise pick the run_id index and read every event of the stream.)
        """
        raise NotImplementedError(f"{type(self).__name__} has no poll statement")

    def build_check_sql(self, models: Any, status: bool,
                        pairs: Optional[List[Tuple[str, int]]] = None, token: int = 0) -> str:
        """`polls_by_checks` dialects: the timed check of streams, given as [run id, seq] pairs,
        which returns (run id, status) of those with news. With `status`, news is also a status
        other than open or a stream that is gone (it reads each stream's row: dearer); without,
        only the next event. The pairs are the statement's one parameter, a JSON array; or, given
        `pairs`, they are written into the statement (to PREPARE once and EXECUTE many times,
        `check_statements`), whose one parameter must then be `token`: any other value adds a
        row of NULLs, which tells a session's statement of that name is not this one."""
        raise NotImplementedError(f"{type(self).__name__} polls without checks")

    def check_statements(self, name: str) -> Tuple[str, str, str]:
        """`polls_by_checks` dialects: PREPARE `name` (the text its parameter), EXECUTE it (its
        parameter the token) and DEALLOCATE it."""
        raise NotImplementedError(f"{type(self).__name__} polls without checks")

    @property
    def prepares_checks(self) -> bool:
        """`polls_by_checks` dialects: the server runs `check_statements` (PREPARE once, EXECUTE
        with the token as a value); otherwise every timed check sends its JSON array."""
        return False

    def drop_index_sql(self, index: str, table: str) -> str:
        """DROP INDEX of the quoted `index` on the quoted `table`."""
        return f"DROP INDEX {index}"

    # Lost connections (the storage's reconnect layer asks these; only after a statement failed).
    def is_connection_lost(self, exc: BaseException) -> bool:
        """True when `exc`, just raised on the calling thread, means its connection is gone
        (server restarted or killed, network cut) or the server cannot be reached now.

        Only errors that come from the driver count: peewee's own ("database not
        initialised", "connection not opened") are the caller's business.
        """
        if not isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
            return False
        err = getattr(exc, "orig", None)
        if err is None:
            return False
        db = self.database
        if db.is_closed():  # the error came from opening a connection
            return self._unreachable(err)
        return self._dead(db._state.conn, err)  # type: ignore[attr-defined]

    def was_not_sent(self, exc: BaseException) -> bool:
        """True when the statement that raised `exc` certainly never reached the server
        (the connection was already known dead, or could not be opened), so running it
        again cannot apply it twice."""
        return isinstance(exc, peewee.InterfaceError) or self.database.is_closed()

    def hung_up(self, conn: Any) -> bool:
        """True when the server may have closed the idle connection `conn` (its socket has
        unread input: a termination notice or end-of-file). One non-blocking `select`, no
        round trip; asked before statements that must not run twice."""
        return False

    def _dead(self, conn: Any, err: BaseException) -> bool:
        """True when the driver connection `conn` is unusable after `err`."""
        return False

    def _unreachable(self, err: BaseException) -> bool:
        """True when opening a connection failed because the server cannot be reached."""
        return False


class SqliteDialect(Dialect):
    """SQLite: JSON and timestamps as text (`...mmmZ`), foreign keys on, WAL, IMMEDIATE writes."""

    name = "sqlite"
    now_default = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
    single_writer = True
    has_data_version = True
    fork_waits_for_statements = True
    encode_ts = staticmethod(sqlite_encode_ts)
    decode_ts = staticmethod(sqlite_decode_ts)

    def transaction(self) -> ContextManager[Any]:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # can fail with "database is locked" instead of waiting on the busy timeout.
        db = self.database
        if db.in_transaction():
            return db.atomic()
        return db.atomic(lock_type="IMMEDIATE")

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        return "FOREIGN KEY" in str(exc)

    def is_transient(self, exc: BaseException) -> bool:
        # SQLITE_BUSY once the busy timeout ran out: the writer lock is not granted in any
        # fair order, so a writer among many can miss it for the whole timeout. Nothing was
        # written; a single statement (or a transaction that could not begin) can run again.
        err = driver_error(exc)
        code: Optional[int] = getattr(err, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF == 5
        return "database is locked" in str(err)

    def prepare(self, causal_reads: bool = True) -> None:
        # `permanent=True` records the pragma so every connection the database opens later
        # (one per thread) gets it too; the current connection gets it now.
        db = cast(peewee.SqliteDatabase, self.database)  # detect_dialect picks SQLite for these only
        if isinstance(db, PooledDatabase) and db.connect_params.get("check_same_thread", True):
            # The pool hands a connection made by one thread to another, which sqlite3 refuses
            # ("SQLite objects created in a thread can only be used in that same thread").
            raise DialectError(
                f"this pooled SQLite database ({type(db).__name__}) opens connections that only their "
                "own thread may use, but the pool hands them between threads: create it with "
                "check_same_thread=False (open_database(url, pooled=True) does)")
        db.pragma("foreign_keys", 1, permanent=True)
        if db.database and db.database != ":memory:":
            # WAL lets readers (stream followers) run while one writer appends.
            db.pragma("journal_mode", "wal", permanent=True)

    def build_poll_sql(self, models: Any) -> str:
        streams = models.stream._meta.table_name
        events = models.stream_event._meta.table_name
        index = "stream_events_run_id_seq_unique"
        return (f"SELECT w.run, s.status, w.last, e.seq, e.event FROM "
                f"(SELECT json_extract(j.value, '$[0]') AS run, json_extract(j.value, '$[1]') AS since, "
                f"json_extract(j.value, '$[2]') AS upto, "
                f"(SELECT MAX(x.seq) FROM {events} x INDEXED BY {index} "
                f"WHERE x.run_id = json_extract(j.value, '$[0]')) AS last FROM json_each(?) AS j) w "
                f"LEFT JOIN {streams} s ON s.id = w.run "
                f"LEFT JOIN {events} e INDEXED BY {index} "
                f"ON e.run_id = w.run AND e.seq > w.since AND e.seq <= w.upto "
                f"WHERE s.id IS NULL OR s.status <> 'open' OR w.last > w.since")


class PostgresDialect(Dialect):
    """PostgreSQL: jsonb and timestamptz."""

    name = "postgres"
    json_type = "JSONB"
    timestamp_type = "TIMESTAMPTZ"
    now_default = "now()"
    encode_ts = staticmethod(postgres_encode_ts)
    decode_ts = staticmethod(datetime_to_ms)
    field_load_json = staticmethod(load_native)
    dump_json = staticmethod(dumps_for_jsonb)
    stream_row_share_lock = "FOR SHARE"
    notifies_appends = True
    prepares_polls = True
    polls_with_arrays = True
    can_build_index_concurrently = True

    def build_poll_sql(self, models: Any) -> str:
        # $1..$3: the poller PREPAREs it (or puts %s in their place for plain statements).
        streams = models.stream._meta.table_name
        events = models.stream_event._meta.table_name
        return (f"SELECT w.run, s.status, w.last, e.seq, e.event::text FROM "
                f"(SELECT j.run, j.since, j.upto, (SELECT max(x.seq) FROM {events} x WHERE x.run_id = j.run) "
                f"AS last FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS j(run, since, upto)) w "
                f"LEFT JOIN {streams} s ON s.id = w.run "
                f"LEFT JOIN {events} e ON e.run_id = w.run AND e.seq > w.since AND e.seq <= w.upto "
                f"WHERE s.id IS NULL OR s.status <> 'open' OR w.last > w.since")

    def select_json(self, column: peewee.Field) -> peewee.Node:
        # As text, so SQL NULL (absent) and JSON null (None) stay apart: the driver's
        # own jsonb decoding turns both into None.
        return peewee.Cast(column, "text")

    def foreign_keys(self, table: str) -> List[Tuple[str, str, str]]:
        # Not information_schema (peewee's way): it shows only constraints of tables the current
        # role owns, so a least-privilege runtime role would see no foreign key at all.
        cursor = self.database.execute_sql(
            "SELECT a.attname, r.relname, ra.attname FROM pg_constraint c"
            " JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
            " JOIN pg_class r ON r.oid = c.confrelid"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
            " JOIN pg_attribute ra ON ra.attrelid = c.confrelid AND ra.attnum = c.confkey[1]"
            " WHERE c.contype = 'f' AND t.relname = %s AND n.nspname = current_schema()", (table,))
        return [tuple(row) for row in cursor.fetchall()]

    def json_param(self, node: peewee.Node) -> peewee.Node:
        # An untyped parameter in a SELECT list resolves to text, which jsonb refuses.
        return peewee.Cast(node, "jsonb")

    def is_transient(self, exc: BaseException) -> bool:
        # serialization_failure, deadlock_detected
        return pg_code(exc) in ("40001", "40P01")

    def is_read_only(self, exc: BaseException) -> bool:
        # read_only_sql_transaction: a hot standby, or default_transaction_read_only
        return pg_code(exc) == "25006"

    def hung_up(self, conn: Any) -> bool:
        try:
            return socket_readable(conn.fileno())
        except Exception:  # closed: let the statement find out
            return False

    def _dead(self, conn: Any, err: BaseException) -> bool:
        # psycopg2 marks a broken connection closed (2); psycopg 3 sets `closed`/`broken`.
        if getattr(conn, "closed", 0) or getattr(conn, "broken", False):
            return True
        code = getattr(err, "pgcode", None) or getattr(err, "sqlstate", None)
        # 08P01 (protocol violation) on a connection the driver still holds open is about the
        # statement (pgbouncer refusing a prepared statement), not a dead connection.
        return code != "08P01" and pg_gone_code(code)

    def _unreachable(self, err: BaseException) -> bool:
        # libpq reports connection failures without a SQLSTATE: recognise them by their text
        # (a wrong password or database name is not "unreachable").
        return (pg_gone_code(getattr(err, "pgcode", None) or getattr(err, "sqlstate", None))
                or PG_UNREACHABLE.search(str(err)) is not None)

    def rejected_json_column(self, exc: BaseException) -> Optional[str]:
        # 54001 "stack depth limit exceeded": jsonb parses recursively, and a value nested some
        # tens of thousands of levels deep exhausts max_stack_depth. The message names no column.
        return "" if pg_code(exc) == "54001" else None

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        code: Optional[str] = (getattr(getattr(exc, "orig", None), "pgcode", None)
                               or getattr(exc, "pgcode", None))
        if code is not None:
            return code == "23503"
        return "foreign key" in str(exc)


class MySQLDialect(Dialect):
    """MySQL and MariaDB: JSON, DATETIME(3) in UTC, VARCHAR(255) keys, utf8mb4_bin (case-sensitive ids)."""

    name = "mysql"
    table_settings = ("DEFAULT CHARSET=utf8mb4", "COLLATE=utf8mb4_bin")
    key_type = "VARCHAR(255)"
    text_type = "LONGTEXT"
    json_type = "JSON"
    timestamp_type = "DATETIME(3)"
    now_default = "CURRENT_TIMESTAMP(3)"
    encode_ts = staticmethod(mysql_encode_ts)
    decode_ts = staticmethod(datetime_to_ms)
    stream_row_share_lock = "LOCK IN SHARE MODE"
    polls_by_checks = True

    def build_poll_sql(self, models: Any) -> str:
        return self.build_check_sql(models, status=True)

    def build_check_sql(self, models: Any, status: bool,
                        pairs: Optional[List[Tuple[str, int]]] = None, token: int = 0) -> str:
        # MariaDB reads a range of the index only when its bounds are constants, not columns of
        # JSON_TABLE: a timed poll first asks which streams have news (the next seq is there --
        # one point lookup each --, the status is not open, or the stream is gone), then reads
        # those one at a time, as constants. (A hole in the numbering of an open stream is then
        # seen by pokes and the close, not by timed polls; only foreign writers leave holes.)
        # The LEFT JOINs (rather than OR EXISTS, a dependent subquery per row) keep both
        # lookups point reads of a unique index. Written-in pairs are a VALUES list, run ids as
        # hex literals (no quoting, whatever the SQL mode); EXECUTEd, it costs the server about
        # 60% of the JSON_TABLE form, which parses the array again each time.
        streams = models.stream._meta.table_name
        events = models.stream_event._meta.table_name
        if pairs is None:
            source = ("JSON_TABLE(%s, '$[*]' COLUMNS (run VARCHAR(255) CHARACTER SET utf8mb4 COLLATE "
                      "utf8mb4_bin PATH '$[0]', since BIGINT PATH '$[1]')) AS j ")
            head = ""
        else:
            rows = ",".join(f"(_utf8mb4 X'{run.encode().hex()}',{int(since)})" for run, since in pairs)
            head = f"WITH j(run, since) AS (VALUES {rows}) "
            source = "j "
        sql = f"{head}SELECT j.run, {'s.status' if status else 'NULL'} FROM {source}"
        if status:
            sql += (f"LEFT JOIN {streams} s ON s.id = j.run "
                    f"LEFT JOIN {events} x ON x.run_id = j.run AND x.seq = j.since + 1 "
                    f"WHERE s.id IS NULL OR s.status <> 'open' OR x.run_id IS NOT NULL")
        else:
            sql += f"JOIN {events} x ON x.run_id = j.run AND x.seq = j.since + 1"
        if pairs is not None:
            sql += f" UNION ALL SELECT NULL, NULL FROM DUAL WHERE NOT (? <=> {int(token)})"
        return sql

    def check_statements(self, name: str) -> Tuple[str, str, str]:
        return f"PREPARE {name} FROM %s", f"EXECUTE {name} USING %s", f"DEALLOCATE PREPARE {name}"

    @property
    def prepares_checks(self) -> bool:
        # EXECUTE ... USING takes a value only on MariaDB (10.2.3 on); MySQL takes user variables.
        return self.is_mariadb

    def drop_index_sql(self, index: str, table: str) -> str:
        return f"DROP INDEX {index} ON {table}"

    def __init__(self, database: peewee.Database) -> None:
        super().__init__(database)
        self._mariadb: Optional[bool] = None

    @property
    def is_mariadb(self) -> bool:
        """True on MariaDB (JSON is LONGTEXT with a validity check there). Asks the server once."""
        if self._mariadb is None:
            version = self.database.execute_sql("SELECT VERSION()").fetchone()[0]
            self._mariadb = "mariadb" in str(version).lower()
        return self._mariadb

    def text_equals(self, column: peewee.Node, value: peewee.Node) -> peewee.Node:
        # utf8mb4_bin is a PAD SPACE collation: `agent_name = 'agent'` also matches 'agent '.
        # The plain comparison keeps the index usable; the binary one makes the match exact.
        return (column == value) & (peewee.Cast(column, "BINARY") == peewee.Cast(value, "BINARY"))

    def text_order(self, column: peewee.Node) -> peewee.Node:
        # PAD SPACE again: 'a' and 'a ' tie, and 'a\t' sorts before 'a'. UTF-8 bytes sort by code point.
        return peewee.Cast(column, "BINARY")

    def upsert(self, insert: Any, key: peewee.Field, others: List[Any]) -> Any:
        # ON DUPLICATE KEY UPDATE names no target: every unique key of the table is one.
        return insert.on_conflict(preserve=others)

    def skip_duplicates(self, insert: Any) -> Any:
        # INSERT IGNORE would also turn other errors (truncation, bad values) into warnings:
        # leave the insert plain and let a duplicate raise IntegrityError.
        return insert

    def is_transient(self, exc: BaseException) -> bool:
        # ER_LOCK_DEADLOCK (also Galera's certification failure), ER_LOCK_WAIT_TIMEOUT: InnoDB
        # rolled the statement or transaction back. ER_UNKNOWN_COM_ERROR 1047: a Galera node
        # that is not synced ("WSREP has not yet prepared node for application use") ran nothing.
        # ER_ERROR_DURING_COMMIT 1180 on Galera: the write set could not be replicated (the node
        # lost the cluster), so the transaction was rolled back there.
        return mysql_errno(exc) in (1213, 1205, 1047, 1180)

    def needs_new_connection(self, exc: BaseException) -> bool:
        return mysql_errno(exc) in (1047, 1180)

    def is_read_only(self, exc: BaseException) -> bool:
        # ER_OPTION_PREVENTS_STATEMENT (--read-only), ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION,
        # ER_READ_ONLY_MODE
        return mysql_errno(exc) in (1290, 1792, 1836)

    #: wsrep_sync_wait bits for causal reads: 1 reads (and BEGIN), 2 UPDATE/DELETE, 4 INSERT/REPLACE
    #: (the stream append's INSERT ... SELECT and a message's foreign-key check read through these),
    #: 8 SHOW (create_tables asks which tables exist; a DROP on another node must be seen first).
    CAUSAL_READS = 15

    def prepare(self, causal_reads: bool = True) -> None:
        # On Galera every node takes writes but applies the others' asynchronously: without
        # wsrep_sync_wait a read on node 2 may not see a commit acknowledged by node 1. Each
        # connection the database opens gets the setting once (checked on first connect).
        if not causal_reads or getattr(self.database, "_bap_causal_hook", False):
            return
        database = self.database
        initialize = database._initialize_connection  # type: ignore[attr-defined]
        state: Dict[str, Any] = {"galera": None}

        def initialize_connection(conn: Any) -> None:
            initialize(conn)
            if getattr(conn, "_bap_sync_wait", False):
                return
            cursor = conn.cursor()
            try:
                if state["galera"] is None:
                    try:
                        cursor.execute("SELECT @@wsrep_on")
                        state["galera"] = str(cursor.fetchone()[0]).upper() in ("1", "ON")
                    except Exception:  # MySQL: no such variable (no Galera)
                        state["galera"] = False
                if state["galera"]:
                    cursor.execute("SET SESSION wsrep_sync_wait = %s", (self.CAUSAL_READS,))
            finally:
                cursor.close()
            try:
                conn._bap_sync_wait = True
            except AttributeError:  # a driver connection without a __dict__: set it each time
                pass

        database._initialize_connection = initialize_connection  # type: ignore[attr-defined]
        database._bap_causal_hook = True  # type: ignore[attr-defined]
        if not database.is_closed():
            initialize_connection(database._state.conn)  # type: ignore[attr-defined]

    def collation_problems(self, tables: List[str]) -> List[str]:
        # Tables made by another tool get the server's default collation, case-insensitive
        # (utf8mb4_general_ci, ..._0900_ai_ci): there `Run1` and `run1` are one key, and an
        # upsert of one overwrites the other. A binary or case-sensitive one is what ids need.
        # (PAD SPACE alone is fine: ids ending in a space are refused on every dialect.)
        if not tables:
            return []
        marks = ", ".join(["%s"] * len(tables))
        cursor = self.database.execute_sql(
            "SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME, COLLATION_NAME "
            "FROM information_schema.COLUMNS "
            f"WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ({marks}) "
            "AND DATA_TYPE IN ('varchar', 'char') "
            "ORDER BY TABLE_NAME, ORDINAL_POSITION", list(tables))
        bad: Dict[str, List[str]] = {}
        for table, column, charset, collation in cursor.fetchall():
            collation = str(collation or "").lower()
            if str(charset or "").lower() != "utf8mb4" or not (collation.endswith("_bin")
                                                                or "_cs" in collation):
                bad.setdefault(str(table), []).append(f"{column} ({collation or charset})")
        return [f"table {table} has key columns whose collation is case-insensitive or not utf8mb4: "
                f"{', '.join(columns)}; ids differing only in case would be one key. Fix with: "
                f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                for table, columns in bad.items()]

    def requires_primary_key(self) -> bool:
        # MySQL 8: sql_require_primary_key; MariaDB: innodb_force_primary_key, and on Galera
        # wsrep_mode=REQUIRED_PRIMARY_KEY. A variable the server lacks reads as off.
        for sql in ("SELECT @@sql_require_primary_key", "SELECT @@innodb_force_primary_key",
                    "SELECT @@wsrep_on AND FIND_IN_SET('REQUIRED_PRIMARY_KEY', @@wsrep_mode)"):
            try:
                row = self.database.execute_sql(sql).fetchone()
            except peewee.DatabaseError:
                continue
            if row and row[0] and str(row[0]).upper() not in ("0", "OFF"):
                return True
        return False

    def is_galera(self) -> bool:
        """True when the server is a Galera cluster node (wsrep_on). One query."""
        try:
            row = self.database.execute_sql("SELECT @@wsrep_on").fetchone()
        except peewee.DatabaseError:
            return False
        return str(row[0]).upper() in ("1", "ON")

    def was_not_sent(self, exc: BaseException) -> bool:
        # 2006 "server has gone away" is raised when writing the statement failed.
        return super().was_not_sent(exc) or mysql_errno(exc) == 2006

    def hung_up(self, conn: Any) -> bool:
        sock = getattr(conn, "_sock", None)  # PyMySQL
        try:
            return socket_readable(sock.fileno() if sock is not None else conn.fileno())
        except Exception:
            return False

    def _dead(self, conn: Any, err: BaseException) -> bool:
        # PyMySQL drops its socket (`open` False) when the connection breaks; mysqlclient
        # keeps `open` true, so the error codes decide too.
        if not getattr(conn, "open", True):
            return True
        args: Tuple[Any, ...] = getattr(err, "args", ())
        return bool(args) and args[0] in MYSQL_GONE

    def _unreachable(self, err: BaseException) -> bool:
        args: Tuple[Any, ...] = getattr(err, "args", ())
        return bool(args) and args[0] in MYSQL_UNREACHABLE

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        args = getattr(getattr(exc, "orig", None), "args", None) or getattr(exc, "args", ())
        if args and isinstance(args[0], int):
            return args[0] in (1451, 1452)
        return "foreign key constraint" in str(exc)

    def rejected_json_column(self, exc: BaseException) -> Optional[str]:
        # MariaDB's JSON is LONGTEXT CHECK (JSON_VALID(col)), and JSON_VALID refuses nesting
        # deeper than 31 levels: error 4025 "CONSTRAINT `table.column` failed". (MySQL: 3157.)
        args = getattr(getattr(exc, "orig", None), "args", None) or getattr(exc, "args", ())
        if not args or args[0] not in (4025, 3157):
            return None
        match = re.search(r"`[^`.]+\.([^`]+)`", str(args[1]) if len(args) > 1 else "")
        return match.group(1) if match else ""


_BY_NAME: Dict[str, Type[Dialect]] = {"sqlite": SqliteDialect, "postgres": PostgresDialect,
                                      "mysql": MySQLDialect}
_ALIASES = {"postgresql": "postgres", "pg": "postgres", "mariadb": "mysql", "sqlite3": "sqlite"}


def unwrap(db: Any) -> peewee.Database:
    """The real database behind a `DatabaseProxy`; the database itself otherwise."""
    if isinstance(db, peewee.DatabaseProxy):
        if db.obj is None:
            raise DialectError("the DatabaseProxy is not initialised: call proxy.initialize(db) first")
        return unwrap(db.obj)
    if not isinstance(db, peewee.Database):
        raise DialectError(f"expected a peewee Database, got {type(db).__name__}")
    return db


def _inferred_class(db: peewee.Database) -> Type[Dialect]:
    if isinstance(db, peewee.SqliteDatabase):
        return SqliteDialect
    if isinstance(db, peewee.PostgresqlDatabase):
        return PostgresDialect
    if isinstance(db, peewee.MySQLDatabase):
        return MySQLDialect
    raise DialectError(
        f"unsupported database class {type(db).__name__}: expected a SQLite, PostgreSQL or MySQL database"
    )


def detect_dialect(db: Any, dialect: Optional[str] = None) -> Dialect:
    """The `Dialect` for `db` (any peewee database or an initialised proxy).

    :param db: the peewee database.
    :param dialect: "sqlite", "postgres" or "mysql"; an error when it contradicts `db`.
    """
    real = unwrap(db)
    inferred = _inferred_class(real)
    if dialect is not None:
        name = _ALIASES.get(str(dialect).lower(), str(dialect).lower())
        if name not in _BY_NAME:
            raise DialectError(f"unknown dialect {dialect!r}: expected one of {', '.join(DIALECT_NAMES)}")
        if _BY_NAME[name] is not inferred:
            raise DialectError(
                f"dialect {dialect!r} contradicts the database, a {type(real).__name__} ({inferred.name})"
            )
    return inferred(real)
