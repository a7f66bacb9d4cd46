"""A stream's event rows: an event checked and encoded, stored under a seq only if that seq is
next, read back after a lost reply ("How streams.append flows" in docs/architecture.md).

`appends.Appends` decides which number to try and when to try again; this module runs the
statements, and answers whether a row went in.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import peewee

from .errors import ConflictError, NotFoundError, RecordError
from .executor import Applied, json_refused
from .query import MultiRowInsert, compile_statement, first_row, marker
from .records import check_text, check_ts, make_json_check, now_ms
from .tables import Tables

__all__ = ["EventRows", "Encoded"]

_EVENTS = "streamEvents"
_STREAMS = "streams"

#: An event ready to store: (timestamp parameter, event JSON).
Encoded = Tuple[Any, str]


class _SeqTaken(Exception):
    """Another writer took the seq this attempt used: try again with a fresh number."""


class EventRows:
    """The `stream_events` rows of every stream: store one if its seq is next, the rest of a batch,
    read one back, and the stream's last seq."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        db, d = tables.executor.database, tables.executor.dialect
        self._dialect = d
        self._check_json = make_json_check(d)
        self._encode_ts = d.encode_ts
        self._load_json = d.load_json
        S, E = tables.models.stream, tables.models.stream_event
        fields = [E.id, E.run_id, E.seq, E.timestamp, E.event]

        # Constants are written into the SQL, not bound: fewer parameters for the driver to quote.
        last_seq = E.select(peewee.fn.COALESCE(peewee.fn.MAX(E.seq), peewee.SQL("0"))).where(
            E.run_id == marker("run"))
        # One event, stored only if its stream exists and `seq` follows the last event.
        checked = S.select(marker("id"), marker("run"), marker("seq"), marker("ts"),
                           d.json_param(marker("event"))).where(
            (S.id == marker("run")) & (last_seq == marker("prev")))
        checked = checked.where(S.status == peewee.SQL("'open'"))  # a closed stream takes no more events
        if d.row_share_lock is not None:
            # Lock the stream row shared: a close racing this append waits for it to commit, or it
            # sees the close (READ COMMITTED re-reads the locked row) and stores nothing. Without
            # the lock an append begun before the close could commit after it, unseen by the
            # followers that ended at the close. (SQLite has one writer at a time anyway.)
            checked = checked.for_update(d.row_share_lock)
        # On PostgreSQL the same statement NOTIFYs the pollers of all processes (Dialect.notify_sql).
        insert = d.skip_duplicates(E.insert_from(checked, fields))
        insert = insert.returning(E.run_id) if d.notifies_appends else insert.returning()
        statement = compile_statement(db, insert)
        self._insert_checked = statement._replace(sql=d.notify_sql(statement.sql))
        # The status and last seq of a stream (0 when it has no event); no row when there is no stream.
        self._last_seq = compile_statement(db, S.select(S.status, last_seq).where(S.id == marker("run")))
        # Read-back after a lost reply: the event stored under (run, seq), if any.
        self._event_at = compile_statement(db, E.select(d.select_json(E.event)).where(
            (E.run_id == marker("run")) & (E.seq == marker("seq"))))
        # The rest of an append_many's events: a plain INSERT (a duplicate raises), since skipping
        # duplicates costs PostgreSQL a speculative insertion per row (about a third more per event).
        self._rows = MultiRowInsert(db, E, fields)

    def encode(self, event: Any, index: Optional[int] = None) -> Encoded:
        """(timestamp parameter, event JSON) for `event` (`index`: its place in a batch), or
        RecordError naming what is wrong."""
        where = "event" if index is None else f"event[{index}]"
        # `type(...) is dict` first: isinstance against typing.Mapping costs microseconds per event.
        if type(event) is not dict:
            if not isinstance(event, Mapping):
                raise RecordError(_EVENTS, where,
                                  f"must be an event object (dict), got {type(event).__name__}")
            event = dict(event)  # a Mapping the JSON encoder may not take as it is
        stamp = event.get("timestamp")
        if isinstance(stamp, float) and math.isfinite(stamp):
            stamp = int(stamp)  # JavaScript has no int: 1700000000000.0 is a fine timestamp
        if type(stamp) is int:
            stamp = check_ts(_EVENTS, f"{where}.timestamp", stamp)
        else:
            stamp = now_ms()  # as Better Agent: a numeric timestamp, else now
        return self._encode_ts(stamp), self._check_json(_EVENTS, where, event)

    def insert_first(self, run_id: str, seq: int, stamp: Any, body: str) -> bool:
        """Store one event as number `seq` if the stream exists and `seq` is next; else False."""
        event_id = check_text(_EVENTS, "id", f"{run_id}:{seq}", allow_empty=False)
        statement = self._insert_checked
        try:
            # idempotent=False: after a lost reply the event may be stored already; a
            # second run would then report the number taken and the event would be stored again
            # under the next number. So the executor reconnects and `read_back` settles it instead.
            cursor = self._execute(statement.sql, statement.params(
                {"id": event_id, "run": run_id, "seq": seq, "ts": stamp, "event": body, "prev": seq - 1}),
                idempotent=False, resolve=lambda: self.read_back(run_id, seq, body))
        except peewee.IntegrityError:  # MySQL: a duplicate raises rather than being skipped
            return False
        return bool(cursor.rowcount == 1)

    def insert_batch(self, run_id: str, seq: int, encoded: List[Encoded]) -> bool:
        """Store events numbered from `seq` in one transaction; False when `seq` is not next."""
        try:
            with self._executor.transaction():
                if not self.insert_first(run_id, seq, *encoded[0]):
                    raise _SeqTaken()
                # The first event holds `seq`: no writer following this protocol can store a
                # later one before this transaction commits, so the rest go in as they are.
                self._insert_rest(run_id, seq + 1, encoded[1:])
        except _SeqTaken:
            return False
        return True

    def read_back(self, run_id: str, seq: int, body: str) -> Optional[Applied]:
        """After a lost reply to the insert of event `seq`: Applied(1) if it is stored,
        Applied(0) if another event holds the number, None if nothing does (run it again)."""
        params = self._event_at.params({"run": run_id, "seq": seq})
        row = first_row(self._execute(self._event_at.sql, params, idempotent=True))
        if row is None:
            return None
        return Applied(1 if self._load_json(row[0]) == json.loads(body) else 0)

    def stored_as(self, run_id: str, seq: int, body: str) -> bool:
        """True when event `seq` of the stream is the event `body` (read back after a lost COMMIT)."""
        if seq <= 0:
            return False
        outcome = self.read_back(run_id, seq, body)
        return outcome is not None and outcome.rowcount == 1

    def last_seq_of(self, run_id: str) -> int:
        """The last seq of the stream (0 when it has none); NotFoundError when there is no stream,
        ConflictError when it is closed."""
        params = self._last_seq.params({"run": run_id})
        row = first_row(self._execute(self._last_seq.sql, params, idempotent=True))
        if row is None:
            raise NotFoundError(_STREAMS, run_id,
                                f"streams: no stream for run {run_id!r}; "
                                "open it first (storage.streams.open)")
        if row[0] != "open":
            raise ConflictError(f"{_EVENTS}: stream {run_id!r} is {row[0]}: a closed stream takes no more "
                                f"events (its followers have ended); nothing was appended")
        return int(row[1])

    def stuck(self, run_id: str, seq: int) -> ConflictError:
        """The error of a seq that is next, yet whose row cannot go in."""
        return ConflictError(
            f"{_EVENTS}: cannot store event {seq} of stream {run_id!r}: "
            f"the row id {run_id}:{seq} is taken by a "
            "row that is not part of this stream, or (inside a transaction on MySQL/MariaDB) another writer "
            "appended to the stream after the transaction began")

    def _insert_rest(self, run_id: str, seq: int, encoded: Sequence[Encoded]) -> None:
        """Store events numbered from `seq` with multi-row INSERTs (inside append_many's transaction)."""
        rows = [(check_text(_EVENTS, "id", f"{run_id}:{n}", allow_empty=False), run_id, n, stamp, body)
                for n, (stamp, body) in enumerate(encoded, seq)]
        for count, params in MultiRowInsert.chunks(rows, sized_by=4):  # 4: the event JSON
            self._insert_rows(run_id, count, params)

    def _insert_rows(self, run_id: str, count: int, params: List[Any]) -> None:
        try:
            stored = self._execute(self._rows.sql(count), params, idempotent=True).rowcount
        except peewee.IntegrityError as exc:
            raise self._taken(run_id, params, exc) from exc
        if stored != count:
            raise self._taken(run_id, params, None)

    def _taken(self, run_id: str, params: List[Any], exc: Optional[Exception]) -> ConflictError:
        first, last = params[2], params[-3]
        detail = f": {exc}" if exc is not None else ""
        return ConflictError(f"{_EVENTS}: cannot store events {first}..{last} of stream {run_id!r}: "
                             f"a row with one of their ids ({run_id}:{first} ...) already exists and was "
                             f"not written by this stream's appenders{detail}")

    def _execute(self, sql: str, params: Any, *, idempotent: bool,
                 resolve: Optional[Callable[[], Any]] = None) -> Any:
        try:
            return self._executor.execute(sql, params, idempotent=idempotent, resolve=resolve)
        except peewee.OperationalError as exc:
            if self._dialect.rejected_json_column(exc) is None:
                raise
            raise json_refused(_EVENTS, "event", exc) from exc
