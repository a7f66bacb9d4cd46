"""PostgreSQL: jsonb and timestamptz; the stream poller's LISTEN/NOTIFY and PREPAREd poll."""
from __future__ import annotations

from typing import Any, List, Optional, Set, Tuple

import peewee

from ..driver_errors import PG_UNREACHABLE, pg_code, pg_gone_code, socket_readable
from ..jsoncodec import dumps_for_jsonb, load_native
from ..timestamps import datetime_to_ms, postgres_encode_ts
from .base import Dialect

__all__ = ["PostgresDialect"]


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

