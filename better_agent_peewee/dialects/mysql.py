"""MySQL and MariaDB: JSON, DATETIME(3) in UTC, VARCHAR(255) keys, utf8mb4_bin; Galera's causal
reads; the stream poller's checks (PREPAREd on MariaDB)."""
from __future__ import annotations

import logging
import random
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import peewee

from ..driver_errors import MYSQL_GONE, MYSQL_UNREACHABLE, mysql_errno, socket_readable
from ..errors import ConnectionLostError
from ..timestamps import datetime_to_ms, mysql_encode_ts
from .aggregates import template
from .base import Dialect
from .polling import POLL_BATCH, Entry, PollReader, Row, Runner, json_array

logger = logging.getLogger(__name__)

__all__ = ["MySQLDialect", "MySQLReader", "PreparedChecks", "build_check_sql", "check_statements",
           "CHECKS_PER_POLL", "STATUS_PAUSE", "PREPARE_PAUSE"]

#: Most streams one check statement asks about (it returns the run ids with news).
CHECKS_PER_POLL = 2000
#: Seconds between the timed checks that also read the streams' status (for closes and deletes by
#: other processes that append no event; the others look for new events only).
STATUS_PAUSE = 0.5
#: Fewest seconds between two PREPAREs of a chunk's timed check.
PREPARE_PAUSE = 1.0
#: The prepared statements (this, then the chunk's number) of the timed checks.
_CHECK_STATEMENT = "better_agent_check"


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
    row_share_lock = "LOCK IN SHARE MODE"
    pads_spaces = True  # (utf8mb4_bin is PAD SPACE: see text_equals, text_order)

    def build_poll_sql(self, models: Any) -> str:
        return build_check_sql(models, status=True)

    def poll_reader(self, runner: Runner, models: Any, connect: Callable[[], Any]) -> PollReader:
        return MySQLReader(runner, self, models, connect)

    @property
    def prepares_checks(self) -> bool:
        """The server runs the poller's PREPAREd checks (`PreparedChecks`): EXECUTE ... USING takes
        a value only on MariaDB (10.2.3 on); MySQL takes user variables."""
        return self.is_mariadb

    def driver_fd(self, conn: Any) -> Optional[int]:
        if hasattr(conn, "fileno"):  # mysqlclient
            return int(conn.fileno())
        sock = getattr(conn, "_sock", None)  # PyMySQL
        return None if sock is None else int(sock.fileno())

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

    def hour_number(self, column: peewee.Node) -> peewee.Node:
        # DATETIME holds UTC without a zone: plain date arithmetic (UNIX_TIMESTAMP would read it
        # in the session's time_zone).
        return template("TIMESTAMPDIFF(HOUR, '1970-01-01 00:00:00', {})", column)

    def milliseconds_between(self, start: peewee.Node, end: peewee.Node) -> peewee.Node:
        return template("FLOOR(TIMESTAMPDIFF(MICROSECOND, {}, {}) / 1000)", start, end)

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

    def is_missing_table(self, exc: BaseException) -> bool:
        return mysql_errno(exc) == 1146  # ER_NO_SUCH_TABLE

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


# -- the stream poller's reads -----------------------------------------------------------

def build_check_sql(models: Any, status: bool,
                    pairs: Optional[List[Tuple[str, int]]] = None, token: int = 0) -> str:
    """The poller's timed check of streams, given as [run id, seq] pairs, which returns (run id,
    status) of those with news. With `status`, news is also a status other than open or a stream
    that is gone (it reads each stream's row: dearer); without, only the next event. The pairs are
    the statement's one parameter, a JSON array; or, given `pairs`, they are written into the
    statement (to PREPARE once and EXECUTE many times, `check_statements`), whose one parameter must
    then be `token`: any other value adds a row of NULLs, which tells a session's statement of that
    name is not this one."""
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


def check_statements(name: str) -> Tuple[str, str, str]:
    """PREPARE `name` (the text its parameter), EXECUTE it (its parameter the token) and
    DEALLOCATE it."""
    return f"PREPARE {name} FROM %s", f"EXECUTE {name} USING %s", f"DEALLOCATE PREPARE {name}"


def one_stream_sql(models: Any) -> str:
    """One stream's status, last seq and events in (since, upto], bounds as constants."""
    streams = models.stream._meta.table_name
    events = models.stream_event._meta.table_name
    return (f"SELECT s.id, s.status, (SELECT MAX(x.seq) FROM {events} x WHERE x.run_id = %s), e.seq, e.event "
            f"FROM {streams} s LEFT JOIN {events} e ON e.run_id = s.id AND e.seq > %s AND e.seq <= %s "
            f"WHERE s.id = %s")


class MySQLReader(PollReader):
    """MariaDB/MySQL's poll: a timed round first checks which streams have news (their next event;
    every STATUS_PAUSE also their status), then reads each of those alone, bounds as constants.
    The check of idle streams is PREPAREd where the server can (`PreparedChecks`)."""

    streams_per_chunk = CHECKS_PER_POLL

    def __init__(self, runner: Runner, dialect: MySQLDialect, models: Any,
                 connect: Callable[[], Any]) -> None:
        super().__init__(runner, dialect, models, connect)
        self._one_sql = one_stream_sql(models)
        self._check_sqls = {status: build_check_sql(models, status) for status in (False, True)}
        self._status_at = 0.0  # when a timed check last read the status
        self._with_status = False  # this round's timed check reads the status
        self.checks = PreparedChecks(runner, dialect, models, self._check_sqls[False])

    def window(self, streams: int) -> int:
        return POLL_BATCH  # (each stream with news is read alone)

    def connected(self, conn: Any) -> None:
        super().connected(conn)
        self.checks.forget()

    def timed_round(self, unchecked: bool) -> bool:
        now = time.monotonic()
        self._with_status = unchecked or now - self._status_at >= STATUS_PAUSE
        if self._with_status:
            self._status_at = now
        return True

    def params(self, entries: List[Entry], full: bool, index: int) -> Any:
        return (json_array([e[:2] for e in entries]) if full else None, entries, index)

    def read(self, params: Any) -> List[Row]:
        check, entries, index = params
        if check is not None:
            # Most timed checks only look for new events (an index point lookup per stream); one
            # every STATUS_PAUSE also reads each stream's row, for closes and deletes that came
            # without an event (this process's own closes poke the poller at once anyway).
            if self._with_status:
                news = list(self._runner.execute(self._check_sqls[True], (check,),
                                                 idempotent=True).fetchall())
            else:
                news = self.checks.run(check, entries, index)
            changed = {row[0] for row in news}
            entries = [e for e in entries if e[0] in changed] if changed else []
        rows: List[Row] = []
        for run_id, since, upto in entries:
            got = self._runner.execute(self._one_sql, (run_id, since, upto, run_id),
                                       idempotent=True).fetchall()
            rows.extend(got if got else [(run_id, None, 0, None, None)])  # no row: the stream is gone
        return rows

    def release(self, conn: Any) -> None:
        self.checks.release(conn)


class PreparedChecks:
    """The timed checks of idle streams, PREPAREd on the poller's connection with their pairs
    written in, one statement per chunk of a round, EXECUTEd every round (MariaDB)."""

    def __init__(self, runner: Runner, dialect: MySQLDialect, models: Any, plain_sql: str) -> None:
        self._runner = runner
        self._dialect = dialect
        self._models = models
        self._plain_sql = plain_sql  # the check with its pairs as a JSON array parameter
        # Per chunk: its PREPAREd statement's connection, token, and the pairs written into it
        # (run id -> seq); and when the last PREPARE was.
        self._prepared: Dict[int, Tuple[Any, int, Dict[str, int]]] = {}
        self._prepared_at = -PREPARE_PAUSE
        self._enabled = True  # (False once the server refused a PREPARE)
        #: Per chunk: its last entries, and those of them not as written into its statement.
        self._hot: Dict[int, Tuple[Any, List[Entry]]] = {}

    def forget(self) -> None:
        """A new connection: the statements were on the old one."""
        self._prepared = {}

    def _plain(self, check: str) -> List[Row]:
        return list(self._runner.execute(self._plain_sql, (check,), idempotent=True).fetchall())

    def run(self, check: str, entries: List[Entry], index: int) -> List[Row]:
        """The rows of the timed check (new events only) of chunk `index`: `entries`, whose pairs
        the JSON array `check` holds.

        Sending the array costs the client tens of kilobytes to escape and send, and the server
        parsing them, every round, for streams that are mostly idle. So the pairs are written into
        a statement PREPAREd on the poller's connection (at most every PREPARE_PAUSE), which each
        round EXECUTEs; only the streams whose seq moved since ("hot") go as an array beside it
        (written in at the next PREPARE: when they stay put for a round, or most have moved).
        When the statement is gone (a new session: a reconnect anywhere on the way) or is not
        ours (another poller's on a pooled connection; told by its token), the whole array is
        sent as before.
        """
        conn = self._runner.connection()
        prepared, hot = self._usable(conn, entries, index)
        if prepared is None:
            if time.monotonic() - self._prepared_at < PREPARE_PAUSE or not self._enabled or \
                    not self._dialect.prepares_checks:
                return self._plain(check)
            self._prepared_at = time.monotonic()
            prepared = self._prepare(entries, index)
            if prepared is None:
                return self._plain(check)
            hot = []
        rows: List[Row]
        try:
            rows = list(self._runner.execute(check_statements(f"{_CHECK_STATEMENT}{index}")[1],
                                             (prepared[1],), idempotent=True).fetchall())
        except peewee.DatabaseError as exc:  # (gone with a new session: PREPARE again)
            logger.debug("stream poller: EXECUTE of the prepared check failed: %s", exc)
            rows = [(None, None)]
        if any(row[0] is None for row in rows):  # not there, or not ours
            self._prepared.pop(index, None)
            return self._plain(check)
        if hot:
            moved = {e[0] for e in hot}
            rows = [row for row in rows if row[0] not in moved]
            hot_array = json_array([e[:2] for e in hot])
            rows.extend(self._runner.execute(self._plain_sql, (hot_array,), idempotent=True).fetchall())
        return rows

    def _usable(self, conn: Any, entries: List[Entry], index: int
                ) -> Tuple[Optional[Tuple[Any, int, Dict[str, int]]], List[Entry]]:
        """Chunk `index`'s prepared statement if it may serve `entries` on `conn` (else None), and
        the entries not as written into it."""
        prepared = self._prepared.get(index)
        if prepared is None or prepared[0] is not conn:
            return None, []
        last = self._hot.get(index)
        if last is not None and last[0] is entries:
            hot = last[1]  # the plan of the last round (an idle round)
            if hot and time.monotonic() - self._prepared_at >= PREPARE_PAUSE:
                return None, hot  # the moved streams stay where they are: write them in
            return prepared, hot
        written = prepared[2]
        hot = [e for e in entries if written.get(e[0]) != e[1]]
        self._hot[index] = (entries, hot)
        if len(hot) * 4 > len(entries) + 64:
            return None, hot  # most of it has moved: write the statement anew
        return prepared, hot

    def _prepare(self, entries: List[Entry], index: int) -> Optional[Tuple[Any, int, Dict[str, int]]]:
        """PREPARE chunk `index`'s timed check with `entries` written in; None if refused."""
        token = random.getrandbits(62)
        pairs = [(e[0], e[1]) for e in entries]
        sql = build_check_sql(self._models, False, pairs, token)
        try:
            self._runner.execute(check_statements(f"{_CHECK_STATEMENT}{index}")[0], (sql,), idempotent=True)
        except peewee.DatabaseError as exc:
            if isinstance(exc, ConnectionLostError) or self._dialect.is_connection_lost(exc):
                raise  # (the round fails, and the next one reconnects)
            logger.info("stream poller: PREPARE refused, sending the whole check each time: %s", exc)
            self._prepared.pop(index, None)
            self._enabled = False
            return None
        prepared = self._prepared[index] = (self._runner.connection(), token, dict(pairs))
        self._hot[index] = (entries, [])
        return prepared

    def release(self, conn: Any) -> None:
        """DEALLOCATE the statements PREPAREd on `conn` (a pooled connection going back)."""
        prepared, self._prepared = self._prepared, {}
        for index, (on, _, _) in prepared.items():
            if on is conn:
                self._runner.execute(check_statements(f"{_CHECK_STATEMENT}{index}")[2], idempotent=True)
