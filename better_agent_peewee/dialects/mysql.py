"""MySQL and MariaDB: JSON, DATETIME(3) in UTC, VARCHAR(255) keys, utf8mb4_bin; Galera's causal
reads; the stream poller's checks (PREPAREd on MariaDB)."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import peewee

from ..driver_errors import MYSQL_GONE, MYSQL_UNREACHABLE, mysql_errno, socket_readable
from ..timestamps import datetime_to_ms, mysql_encode_ts
from .base import Dialect

__all__ = ["MySQLDialect"]


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
        self._causal_reads = False  # (until `prepare`: a dialect only `create_tables` uses sets nothing)
        self._galera: Optional[bool] = None  # a Galera node (wsrep_on); None: not asked yet

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
        # wsrep_sync_wait a read on node 2 may not see a commit acknowledged by node 1. The
        # executor sets it on each connection before its first statement (`set_up_connection`).
        self._causal_reads = causal_reads

    @property
    def sets_up_connections(self) -> bool:
        return self._causal_reads and self._galera is not False

    def set_up_connection(self, conn: Any) -> bool:
        if not self._causal_reads or self._galera is False:
            return False
        # (The driver's errors raised as peewee's, as for any statement: a lost connection here
        # is recovered by the executor like one lost at the statement itself.)
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
            cursor = conn.cursor()
            try:
                if self._galera is None:
                    self._galera = self._asks_wsrep_on(cursor)
                if self._galera:
                    cursor.execute("SET SESSION wsrep_sync_wait = %s", (self.CAUSAL_READS,))
            finally:
                cursor.close()
        return bool(self._galera)

    @staticmethod
    def _asks_wsrep_on(cursor: Any) -> bool:
        try:
            cursor.execute("SELECT @@wsrep_on")
        except Exception as exc:  # MySQL: no such variable (no Galera); a lost connection: raise
            if mysql_errno(exc) in MYSQL_GONE:
                raise
            return False
        return str(cursor.fetchone()[0]).upper() in ("1", "ON")

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

