"""The baseline: minimal hand-written SQL through the raw driver, doing the same job as the adapter.

"The same job" means the same statements' effect, the same durability (autocommit per
operation where the adapter commits per operation, one transaction per batch where it uses
one), and the same record encoding: records in and out are the same dicts (camelCase keys,
epoch-ms ints, decoded JSON), so the baseline pays for json and timestamp conversion too.
It does not validate records: that is part of what the adapter's overhead buys.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

_MS = dt.timedelta(milliseconds=1)
_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

#: Compact JSON text, as Better Agent writes it.
dumps: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
loads = json.loads

RUN_COLUMNS = ("run_id", "agent_name", "thread_id", "scope", "status", "abort_requested_at", "final_event",
               "config", "started_at", "updated_at", "finished_at")
MESSAGE_COLUMNS = ("id", "thread_id", "run_id", "message", "created_at")
EVENT_COLUMNS = ("id", "run_id", "seq", '"timestamp"', "event")


class Raw:
    """One raw connection plus the per-dialect SQL spelling and value codecs a hand-writer uses."""

    def __init__(self, dialect: str, conn: Any, is_mariadb: bool = False) -> None:
        self.dialect = dialect
        self.conn = conn
        self.is_mariadb = is_mariadb
        if dialect == "sqlite":
            self.cursor = conn.cursor()
            self.execute = self.cursor.execute  # returns the cursor; sqlite3 caches prepared statements
            self.ts_in: Callable[[int], Any] = (
                lambda ms: (_EPOCH + ms * _MS).isoformat(timespec="milliseconds") + "Z")
            self.ts_out: Callable[[Any], int] = (
                lambda text: (dt.datetime.fromisoformat(text[:23]) - _EPOCH) // _MS)
            self.json_out: Callable[[Any], Any] = loads
            self.begin = "BEGIN IMMEDIATE"  # as the adapter: take the write lock up front
        else:
            self.cursor = conn.cursor()
            cursor = self.cursor

            def execute(sql: str, params: Sequence[Any] = ()) -> Any:
                cursor.execute(sql, params)
                return cursor

            self.execute = execute
            self.begin = "BEGIN"
            if dialect == "postgres":
                self.ts_in = lambda ms: _EPOCH_UTC + ms * _MS
                self.ts_out = lambda value: (value - _EPOCH_UTC) // _MS
                self.json_out = lambda value: value  # psycopg2 decodes json/jsonb itself
            else:
                self.ts_in = lambda ms: _EPOCH + ms * _MS  # DATETIME(3) holds naive UTC
                self.ts_out = lambda value: (value - _EPOCH) // _MS
                self.json_out = loads

    def sql(self, text: str) -> str:
        """`text` written with ``?`` placeholders and ``"`` quotes, in this driver's spelling."""
        if self.dialect == "sqlite":
            return text
        text = text.replace("?", "%s")
        if self.dialect == "mysql":
            text = text.replace('"', "`")
        return text

    def upsert(self, table: str, columns: Sequence[str], key: str) -> str:
        """INSERT ... ON CONFLICT (key) DO UPDATE / ON DUPLICATE KEY UPDATE for all other columns."""
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        others = [c for c in columns if c != key]
        if self.dialect == "mysql":
            tail = "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in others)
        else:
            tail = f"ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in others)
        return self.sql(f"INSERT INTO {table} ({names}) VALUES ({marks}) {tail}")

    def transaction(self, body: Callable[[], Any]) -> Any:
        """Run `body` in BEGIN ... COMMIT (ROLLBACK on error)."""
        execute = self.execute
        execute(self.begin)
        try:
            result = body()
        except BaseException:
            execute("ROLLBACK")
            raise
        execute("COMMIT")
        return result

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """One multi-row INSERT the idiomatic way for the driver (no transaction of its own)."""
        names = ", ".join(columns)
        if self.dialect == "postgres":
            from psycopg2.extras import execute_values

            execute_values(self.cursor, self.sql(f"INSERT INTO {table} ({names}) VALUES %s"), rows,
                           page_size=max(len(rows), 1))
        elif self.dialect == "mysql":  # pymysql rewrites this into multi-row INSERTs
            self.cursor.executemany(
                self.sql(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"), rows)
        else:
            self.conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})",
                                  rows)

    def bulk_load(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                  chunk: int = 5000) -> int:
        """Load many rows fast (data setup, not measured): chunks of multi-row INSERTs, one transaction
        each."""
        total = 0
        batch: List[Sequence[Any]] = []

        def flush() -> None:
            self.transaction(lambda: self.insert_many(table, columns, batch))

        for row in rows:
            batch.append(row)
            if len(batch) >= chunk:
                flush()
                total += len(batch)
                batch = []
        if batch:
            flush()
            total += len(batch)
        return total

    # -- records -----------------------------------------------------------------------------

    def run_row(self, run_id: str, r: Dict[str, Any]) -> Tuple[Any, ...]:
        """A run record as an agent_runs row."""
        ts = self.ts_in
        final, config, abort, finished = r.get("finalEvent"), r.get("config"), r.get("abortRequestedAt"), \
            r.get("finishedAt")
        return (run_id, r["agentName"], r.get("threadId"), r.get("scope"), r["status"],
                None if abort is None else ts(abort),
                None if final is None else dumps(final),
                None if config is None else dumps(config),
                ts(r["startedAt"]), ts(r["updatedAt"]),
                None if finished is None else ts(finished))

    def run_record(self, row: Sequence[Any]) -> Dict[str, Any]:
        """An agent_runs row as a run record."""
        run_id, agent, thread_id, scope, status, abort, final, config, started, updated, finished = row
        ts, load = self.ts_out, self.json_out
        rec: Dict[str, Any] = {"runId": run_id, "agentName": agent}
        if thread_id is not None:
            rec["threadId"] = thread_id
        if scope is not None:
            rec["scope"] = scope
        rec["status"] = status
        if abort is not None:
            rec["abortRequestedAt"] = ts(abort)
        if final is not None:
            rec["finalEvent"] = load(final)
        rec["config"] = None if config is None else load(config)
        rec["startedAt"] = ts(started)
        rec["updatedAt"] = ts(updated)
        if finished is not None:
            rec["finishedAt"] = ts(finished)
        return rec

    def message_record(self, row: Sequence[Any]) -> Dict[str, Any]:
        """A messages row as a message record."""
        _id, thread_id, run_id, message, created = row
        rec = self.json_out(message)
        rec["threadId"] = thread_id
        if run_id is not None:
            rec["runId"] = run_id
        rec["createdAt"] = self.ts_out(created)
        return rec

    def event_row(self, run_id: str, seq: int, stamp: int, event: Dict[str, Any]) -> Tuple[Any, ...]:
        """A stream_events row."""
        return (f"{run_id}:{seq}", run_id, seq, self.ts_in(stamp), dumps(event))

