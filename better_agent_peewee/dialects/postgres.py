"""PostgreSQL: jsonb and timestamptz; the stream poller's LISTEN/NOTIFY and PREPAREd poll."""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Set, Tuple

import peewee

from ..driver_errors import PG_UNREACHABLE, pg_code, pg_gone_code, socket_readable
from ..jsoncodec import dumps_for_jsonb, load_native
from ..timestamps import datetime_to_ms, postgres_encode_ts
from .aggregates import template
from .base import Dialect
from .polling import Entry, PollReader, Row, Runner, WakeSource

logger = logging.getLogger(__name__)

__all__ = ["PostgresDialect", "PostgresReader", "NotifyWakeSource", "CHANNEL"]

#: The NOTIFY channel of appends and closes (payload: the run id; empty: "look at all").
CHANNEL = "better_agent_streams"
#: Longest run id sent as a NOTIFY payload (PostgreSQL allows under 8000 bytes).
_PAYLOAD_BYTES = 7000
#: The poller's PREPAREd poll statement.
_PREPARED = "better_agent_follow"


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
    row_share_lock = "FOR SHARE"
    notifies_appends = True
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

    def hour_number(self, column: peewee.Node) -> peewee.Node:
        # The epoch of a timestamptz does not depend on the session's TimeZone (date_trunc would).
        return template("CAST(FLOOR(EXTRACT(EPOCH FROM {}) / 3600) AS BIGINT)", column)

    def milliseconds_between(self, start: peewee.Node, end: peewee.Node) -> peewee.Node:
        # Each end floored to its millisecond first, as decode_ts reads a stored microsecond.
        return template("CAST(FLOOR(EXTRACT(EPOCH FROM {}) * 1000) - FLOOR(EXTRACT(EPOCH FROM {}) * 1000) "
                        "AS BIGINT)", end, start)

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

    def invalid_indexes(self, table: str) -> Set[str]:
        cursor = self.database.execute_sql(
            "SELECT i.relname FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_catalog.pg_class t ON t.oid = x.indrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace "
            "WHERE t.relname = %s AND n.nspname = current_schema() AND NOT x.indisvalid", (table,))
        return {name for (name,) in cursor.fetchall()}

    def json_param(self, node: peewee.Node) -> peewee.Node:
        # An untyped parameter in a SELECT list resolves to text, which jsonb refuses.
        return peewee.Cast(node, "jsonb")

    def is_transient(self, exc: BaseException) -> bool:
        # serialization_failure, deadlock_detected
        return pg_code(exc) in ("40001", "40P01")

    def is_read_only(self, exc: BaseException) -> bool:
        # read_only_sql_transaction: a hot standby, or default_transaction_read_only
        return pg_code(exc) == "25006"

    def is_missing_table(self, exc: BaseException) -> bool:
        return pg_code(exc) == "42P01"  # undefined_table

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


    def poll_reader(self, runner: Runner, models: Any, connect: Callable[[], Any]) -> PollReader:
        return PostgresReader(runner, self, models, connect)

    def notify_sql(self, returning_sql: str) -> str:
        # RETURNING pg_notify(...): one NOTIFY per row written, in the statement that writes it.
        head, column = returning_sql.rsplit(" RETURNING ", 1)
        return (f"{head} RETURNING pg_notify('{CHANNEL}', "
                f"CASE WHEN octet_length({column}) <= {_PAYLOAD_BYTES} THEN {column} ELSE '' END)")


class NotifyWakeSource(WakeSource):
    """The NOTIFYs of appends and closes on the poller's connection, which LISTENs (psycopg2 and
    psycopg 3; another driver: polling only)."""

    def __init__(self) -> None:
        self._conn: Any = None

    def listen(self, runner: Runner, conn: Any) -> None:
        """LISTEN on `conn`, the poller's new connection."""
        self._conn = conn
        self.listening = False
        if hasattr(conn, "notifies"):
            try:
                runner.execute(f"LISTEN {CHANNEL}", idempotent=True)
                self.listening = True
            except peewee.DatabaseError as exc:
                logger.info("stream poller: LISTEN failed, following by polling only: %s", exc)

    def unlisten(self, runner: Runner) -> None:
        """UNLISTEN (before a pooled connection goes back)."""
        runner.execute(f"UNLISTEN {CHANNEL}", idempotent=True)

    def fileno(self) -> Optional[int]:
        if not self.listening:
            return None
        try:
            return int(self._conn.fileno())
        except Exception:  # closed: the next poll finds out
            return None

    def take(self) -> Optional[Tuple[Set[str], bool]]:
        if not self.listening:
            return None
        try:
            payloads = _take_notifies(self._conn)
        except Exception:  # a dead connection: the next poll finds out and reconnects
            self.listening = False
            return None
        if not payloads:
            return None
        runs = set(filter(None, payloads))
        return runs, len(runs) < len(payloads)  # an empty payload: a run id too long to send


def _take_notifies(conn: Any) -> List[str]:
    """The payloads of the NOTIFYs the driver connection `conn` has received, without waiting:
    psycopg2 keeps them in a list that `poll()` fills from the socket; psycopg 3 hands them out
    through `notifies(timeout=0)`, including those that came in with a statement's reply."""
    notifies = conn.notifies
    if callable(notifies):  # psycopg 3
        return [n.payload for n in notifies(timeout=0)]
    conn.poll()
    payloads = [n.payload for n in notifies]
    del notifies[:len(payloads)]
    return payloads


class PostgresReader(PollReader):
    """PostgreSQL's poll: three arrays (run ids, after, upto) as parameters, the statement
    PREPAREd on the poller's connection (plain where that cannot work); woken by NOTIFY."""

    def __init__(self, runner: Runner, dialect: Dialect, models: Any, connect: Callable[[], Any]) -> None:
        super().__init__(runner, dialect, models, connect)
        self._prepare = True  # (False once preparing turned out not to work here)
        self._plain_sql = self._sql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
        self._conn: Any = None  # the driver connection PREPARE was done on
        self.wake: NotifyWakeSource = NotifyWakeSource()

    def params(self, entries: List[Entry], full: bool, index: int) -> Any:
        return ([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])

    def connected(self, conn: Any) -> None:
        self._conn = conn
        self.wake.listen(self._runner, conn)
        if self._prepare and type(conn).__module__.split(".")[0] == "psycopg":
            # psycopg 3 binds parameters on the server, and EXECUTE (a utility statement) takes none:
            # it prepares statements itself (prepare_threshold) instead.
            self._prepare = False
        if self._prepare:
            try:
                self._runner.execute(f"PREPARE {_PREPARED}(text[], bigint[], bigint[]) AS {self._sql}",
                                     idempotent=True)
            except peewee.DatabaseError as exc:
                if pg_code(exc) != "42P05":  # 42P05: prepared by an earlier poller on this pooled connection
                    logger.info("stream poller: PREPARE failed, polling with plain statements: %s", exc)
                    self._prepare = False

    def read(self, params: Any) -> List[Row]:
        if not self._prepare:
            return list(self._runner.execute(self._plain_sql, params, idempotent=True).fetchall())
        try:
            return list(self._runner.execute(f"EXECUTE {_PREPARED}(%s, %s, %s)", params,
                                             idempotent=True).fetchall())
        except peewee.DatabaseError as exc:
            if pg_code(exc) != "26000":  # 26000: no such prepared statement
                raise
        if self._runner.connection() is self._conn:
            # Same connection, yet the statement is gone: a pooler (pgbouncer) hands our statements
            # to other server sessions. Plain statements from now on.
            logger.info("stream poller: prepared statements do not stick to this connection; not preparing")
            self._prepare = False
        else:
            self._connect()  # a reconnect inside execute: prepare (and LISTEN) on the new connection
        return self.read(params)

    def release(self, conn: Any) -> None:
        if conn is None:
            return
        self.wake.unlisten(self._runner)
        if self._prepare:
            self._runner.execute(f"DEALLOCATE {_PREPARED}", idempotent=True)
