"""SQLite: JSON and timestamps as text, foreign keys on, WAL, IMMEDIATE writes."""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional, cast

import peewee
from playhouse.pool import PooledDatabase

from ..driver_errors import driver_error
from ..errors import DialectError
from ..timestamps import sqlite_decode_ts, sqlite_encode_ts
from .aggregates import template
from .base import Dialect
from .polling import PollReader, Runner

__all__ = ["SqliteDialect", "SqliteReader"]


class SqliteDialect(Dialect):
    """SQLite: JSON and timestamps as text (`...mmmZ`), foreign keys on, WAL, IMMEDIATE writes."""

    name = "sqlite"
    now_default = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
    single_writer = True
    fork_waits_for_statements = True
    encode_ts = staticmethod(sqlite_encode_ts)
    decode_ts = staticmethod(sqlite_decode_ts)
    limits_union_arms = False

    def hour_number(self, column: peewee.Node) -> peewee.Node:
        # julianday reads the ISO text (its 'Z' or offset included) into whole milliseconds, which
        # the rounding gets back exactly; then integer arithmetic (2440587.5 days: the Unix epoch).
        return template("((CAST(ROUND(julianday({}) * 86400000) AS INTEGER) - 210866760000000) / 3600000)",
                        column)

    def milliseconds_between(self, start: peewee.Node, end: peewee.Node) -> peewee.Node:
        # julianday keeps whole milliseconds; as a double its error is far under half of one.
        return template("CAST(ROUND((julianday({}) - julianday({})) * 86400000) AS INTEGER)", end, start)

    def transaction(self) -> ContextManager[Any]:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # can fail with "database is locked" instead of waiting on the busy timeout.
        db = self.database
        if db.in_transaction():
            return db.atomic()
        return db.atomic(lock_type="IMMEDIATE")

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        return "FOREIGN KEY" in str(exc)

    def is_missing_table(self, exc: BaseException) -> bool:
        return "no such table" in str(driver_error(exc))

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


    def poll_reader(self, runner: Runner, models: Any, connect: Callable[[], Any]) -> PollReader:
        return SqliteReader(runner, self, models, connect)

    def per_connection_database(self) -> bool:
        name = str(self.database.database or "")
        return name in ("", ":memory:") or "mode=memory" in name


class SqliteReader(PollReader):
    """SQLite's poll: the plain statement, and a timed round skipped while `PRAGMA data_version`
    says no connection has committed anything since the last one."""

    def __init__(self, runner: Runner, dialect: Dialect, models: Any, connect: Callable[[], Any]) -> None:
        super().__init__(runner, dialect, models, connect)
        self._data_version: Any = None  # at the last timed round

    def connected(self, conn: Any) -> None:
        super().connected(conn)
        self._data_version = None

    def timed_round(self, unchecked: bool) -> bool:
        if unchecked:  # (a new follower waits for its first answer: read, whatever the version)
            return True
        version = self._runner.execute("PRAGMA data_version", idempotent=True).fetchone()[0]
        changed: bool = version != self._data_version
        self._data_version = version
        return changed

    def failed(self) -> None:
        self._data_version = None
