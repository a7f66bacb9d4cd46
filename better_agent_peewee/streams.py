"""Replayable event streams: open, append, close and follow the events of a run (CONTRACT 4).

A stream is one `streams` row (id = the run id) and its events, rows of
`stream_events` numbered 1, 2, 3 ... per run. Better Agent's own adapter numbers an
event by reading the last seq and then writing, which loses events when two writers
race; here the number is checked by the same statement that stores the event:

    INSERT INTO stream_events (...) SELECT <event> FROM streams
    WHERE streams.id = :run AND (SELECT COALESCE(MAX(seq), 0) ... WHERE run_id = :run) = :seq - 1

The row goes in only if the stream exists and `:seq` is exactly one past the last
event, and the unique (run_id, seq) index referees writers that raced to the same
number: one stores it, the others store nothing (or get a duplicate-key error) and try
the next number. So seq has no gap and no duplicate, and nothing is overwritten, with
any number of threads and processes appending. Each `Streams` remembers the next
number per stream, so the common case (one writer per stream) is that single
statement: one round trip per event. Threads of one process appending to the same
stream take turns on a lock first, so only other processes ever make an append retry.

`resume` follows a stream by polling. Each poll is one statement that reads, in one
snapshot, the stream's status, its last seq and the events in the next window of seqs
after the last one seen (a range scan on (run_id, seq) bounded on both sides), so the
cost of a poll does not grow with the stream's length.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import peewee
from playhouse.pool import PooledDatabase

from .errors import ConflictError, ConnectionLostError, ContentionError, NotFoundError, RecordError
from .executor import Applied, json_refused
from .query import compile_statement, first_row, marker
from .records import STREAM_STATUSES, check_key, check_text, check_ts, make_json_check, now_ms, storable_key
from .tables import TableAdapter, Tables

logger = logging.getLogger(__name__)

__all__ = ["Streams"]

_EVENTS = "streamEvents"
_STREAMS = "streams"
_CLOSED_STATUSES = tuple(s for s in STREAM_STATUSES if s != "open")

#: Width of the seq window one poll of `resume` reads; more is read at once by the next poll.
POLL_BATCH = 500
#: Most rows (and about the most bytes of JSON) in one multi-row INSERT of `append_many`.
_CHUNK_ROWS = 100
_CHUNK_BYTES = 1 << 20
#: Attempts before an append gives up; each failed attempt means another writer got the number.
MAX_ATTEMPTS = 1000
#: Of those, how many may end in a deadlock, serialization failure or (SQLite) busy timeout.
MAX_TRANSIENT = 20
#: Streams whose next seq a `Streams` remembers before it forgets them all.
_MAX_REMEMBERED = 10_000
#: Locks that this process's appenders to the same stream take turns on (streams share them).
_TURNS = 64


class _Lost(Exception):
    """Another writer took the seq this attempt used: try again with a fresh number."""


class Streams:
    """Better Agent's stream store: `storage.streams`.

    Safe to share between threads; every method runs on the calling thread's connection.
    """

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._db: peewee.Database = tables.executor.database
        self._dialect = tables.executor.dialect
        self._table: TableAdapter = tables.table(_STREAMS)
        self._check_json = make_json_check(self._dialect)
        self._encode_ts = self._dialect.encode_ts
        self._load_json = self._dialect.load_json
        # Release a pooled connection between polls (see resume); a plain connection is kept.
        self._pooled = isinstance(self._db, PooledDatabase)
        # run id -> the seq its next event most likely gets. Only a hint: the insert checks it.
        self._next: Dict[str, int] = {}
        # This process's appenders to one stream take turns on a lock of their own, so they
        # neither race each other for numbers nor wait on the database's locks (on SQLite,
        # whose busy handler grants no order, all appenders share one lock: one writer anyway).
        # Other processes still race; the insert's check referees those.
        self._turns = [threading.Lock() for _ in range(1 if self._dialect.single_writer else _TURNS)]

        d = self._dialect
        S, E = tables.models.stream, tables.models.stream_event
        self._event_model = E
        self._event_fields = [E.id, E.run_id, E.seq, E.timestamp, E.event]

        last_seq = E.select(peewee.fn.COALESCE(peewee.fn.MAX(E.seq), 0)).where(E.run_id == marker("run"))
        # One event, stored only if its stream exists and `seq` follows the last event.
        checked = S.select(marker("id"), marker("run"), marker("seq"), marker("ts"),
                           d.json_param(marker("event"))).where(
            (S.id == marker("run")) & (last_seq == marker("prev")))
        insert = d.skip_duplicates(E.insert_from(checked, self._event_fields)).returning()
        self._insert_checked = compile_statement(self._db, insert)
        # The last seq of a stream (0 when it has no event); no row when there is no stream.
        self._last_seq = compile_statement(
            self._db, S.select(last_seq).where(S.id == marker("run")))
        # Read-back after a lost reply: the event stored under (run, seq), if any.
        self._event_at = compile_statement(self._db, E.select(d.select_json(E.event)).where(
            (E.run_id == marker("run")) & (E.seq == marker("seq"))))
        self._close_sql = compile_statement(
            self._db, S.update({S.status: marker("status"), S.updated_at: marker("now"),
                                S.closed_at: marker("now")}).where(S.id == marker("run")))

        # A poll, in one statement and so one snapshot: the stream's status, its last seq, and
        # its events in the window (after, upto] -- a range scan on (run_id, seq) bounded on
        # both sides, whatever the stream's length (MariaDB picks a slow plan for an open-ended
        # `seq > after ORDER BY seq LIMIT n`). No row at all: the stream is gone.
        Last = E.alias("last_event")
        newest = Last.select(peewee.fn.MAX(Last.seq)).where(Last.run_id == marker("run2"))
        poll = (S.select(S.status, newest, E.seq, d.select_json(E.event))
                .join(E, peewee.JOIN.LEFT_OUTER,
                      on=((E.run_id == S.id) & (E.seq > marker("after")) & (E.seq <= marker("upto"))))
                .where(S.id == marker("run")))
        self._poll_sql = compile_statement(self._db, poll)
        self._rows_sql: Dict[int, Any] = {}
        self._rows_lock = threading.Lock()

    # -- the stream record ---------------------------------------------------------------

    def get(self, run_id: str) -> Optional[Dict[str, Any]]:
        """The stream record of `run_id` (runId, status, createdAt, updatedAt, closedAt?), or None."""
        return self._table.get(run_id)

    def open(self, run_id: str) -> None:
        """Write an open stream for `run_id` (replacing any stream record it had).

        :param run_id: the run whose events the stream will hold.
        """
        now = now_ms()
        self._table.set(run_id, {"runId": run_id, "status": "open", "createdAt": now, "updatedAt": now})
        self._remember(run_id, 1)  # a new stream has no event; if it had, the first append finds out

    def close(self, run_id: str, status: str = "closed") -> None:
        """Mark the stream of `run_id` closed (sets status, updatedAt and closedAt).

        Closing a stream that does not exist does nothing. Followers (`resume`) end once
        they have read every event.
        """
        if status not in _CLOSED_STATUSES or type(status) is not str:
            raise RecordError(_STREAMS, "status", f"a stream is closed with one of {', '.join(_CLOSED_STATUSES)}, "
                                                  f"got {status!r:.80}")
        if not storable_key(run_id):  # no stream can have this id
            return
        self._execute(self._close_sql.sql, self._close_sql.params(
            {"status": status, "now": self._encode_ts(now_ms()), "run": run_id}))

    # -- appending -----------------------------------------------------------------------

    def append(self, run_id: str, event: Mapping[str, Any]) -> int:
        """Store `event` as the next event of the stream of `run_id` and return its seq.

        The event's `timestamp` (epoch ms) is the record's timestamp when it is a number,
        else now. Safe under any number of concurrent appenders (threads or processes):
        seqs are 1, 2, 3 ... with no gap or duplicate. One statement in the common case.

        :raises NotFoundError: the stream does not exist (call `open` first).
        :raises RecordError: the event is not a JSON object every dialect can store.
        """
        run_id = check_key(_EVENTS, "runId", run_id)
        return self._store(run_id, [self._encode_event(event)])[0]

    def append_many(self, run_id: str, events: Iterable[Mapping[str, Any]]) -> List[int]:
        """Store `events` as the next events of the stream of `run_id`, in one transaction.

        All are stored with consecutive seqs, or none is. Returns their seqs.

        :raises NotFoundError: the stream does not exist.
        :raises RecordError: an event cannot be stored (nothing is written).
        """
        run_id = check_key(_EVENTS, "runId", run_id)
        encoded = [self._encode_event(event, i) for i, event in enumerate(events)]
        if not encoded:
            self._last_event(run_id)  # still say so when the stream does not exist
            return []
        return self._store(run_id, encoded, batch=True)

    def _store(self, run_id: str, encoded: List[Tuple[Any, str]], batch: bool = False) -> List[int]:
        """Store encoded events as the next of the stream, trying numbers until one holds."""
        failed: Optional[int] = None
        transient = 0
        lost_since: Optional[float] = None
        seq = 0
        turn: Any
        if self._db.in_transaction():
            # It may hold database locks that a thread holding the turn waits for: no queueing.
            turn = contextlib.nullcontext()
        else:
            turn = self._turns[hash(run_id) % len(self._turns)]
            self._executor.connection()  # connect (or get a pooled connection) before queueing
        for attempt in range(MAX_ATTEMPTS):
            try:
                with turn:
                    seq = self._next.get(run_id) or 0
                    if not seq or seq == failed:
                        seq = self._last_event(run_id) + 1
                        if seq == failed and not transient:  # the number is right, yet the row cannot go in
                            raise self._stuck(run_id, seq)
                    if batch:
                        stored = self._insert_batch(run_id, seq, encoded)
                    else:
                        stored = self._insert_first(run_id, seq, *encoded[0])
            except ConnectionLostError as exc:
                # append_many's own transaction lost its connection: rolled back, or (lost at
                # COMMIT) maybe committed. Settle it by reading back the first event, then go on.
                if self._db.in_transaction() or not batch:
                    raise
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self._executor.reconnect_window:
                    raise
                self._next.pop(run_id, None)
                if exc.maybe_applied and self._stored_as(run_id, seq, encoded[0][1]):
                    self._remember(run_id, seq + len(encoded))
                    return list(range(seq, seq + len(encoded)))
                continue
            except peewee.DatabaseError as exc:
                if self._db.in_transaction() or not self._executor.rerunnable(exc):
                    raise
                # A conflict: another writer (or node) got in first. Go on while the stream
                # moves on; give up only after MAX_TRANSIENT conflicts in a row at one number.
                transient = 1 if seq != failed else transient + 1
                failed = seq
                if transient > MAX_TRANSIENT:
                    raise ContentionError(f"{_EVENTS}: appending to stream {run_id!r} conflicted {transient} "
                                          f"times at seq {seq} (last: {exc}); nothing was stored: retry later",
                                          getattr(exc, "orig", exc)) from exc
                logger.debug("append to %r: %s; retrying", run_id, exc)
                self._next.pop(run_id, None)
                _backoff(attempt)
                continue
            if stored:
                self._remember(run_id, seq + len(encoded))
                return list(range(seq, seq + len(encoded)))
            # Another writer took `seq` (or the stream is gone): look again.
            failed, transient = seq, 0
            self._next.pop(run_id, None)
            _backoff(attempt)
        raise ConflictError(f"{_EVENTS}: gave up appending to stream {run_id!r} after {MAX_ATTEMPTS} attempts; "
                            "other writers took every number tried")

    def _insert_batch(self, run_id: str, seq: int, encoded: List[Tuple[Any, str]]) -> bool:
        """Store events numbered from `seq` in one transaction; False when `seq` is not next."""
        try:
            with self._executor.transaction():
                if not self._insert_first(run_id, seq, *encoded[0]):
                    raise _Lost()
                # The first event holds `seq`: no writer following this protocol can store a
                # later one before this transaction commits, so the rest go in as they are.
                self._insert_rest(run_id, seq + 1, encoded[1:])
        except _Lost:
            return False
        return True

    def _encode_event(self, event: Any, index: Optional[int] = None) -> Tuple[Any, str]:
        """(timestamp parameter, event JSON) for `event`, or RecordError naming what is wrong."""
        where = "event" if index is None else f"event[{index}]"
        # `type(...) is dict` first: isinstance against typing.Mapping costs microseconds per event.
        if type(event) is not dict:
            if not isinstance(event, Mapping):
                raise RecordError(_EVENTS, where, f"must be an event object (dict), got {type(event).__name__}")
            event = dict(event)  # a Mapping the JSON encoder may not take as it is
        stamp = event.get("timestamp")
        if isinstance(stamp, float) and math.isfinite(stamp):
            stamp = int(stamp)  # JavaScript has no int: 1700000000000.0 is a fine timestamp
        if type(stamp) is int:
            stamp = check_ts(_EVENTS, f"{where}.timestamp", stamp)
        else:
            stamp = now_ms()  # as Better Agent: a numeric timestamp, else now
        return self._encode_ts(stamp), self._check_json(_EVENTS, where, event)

    def _insert_first(self, run_id: str, seq: int, stamp: Any, body: str) -> bool:
        """Store one event as number `seq` if the stream exists and `seq` is next; else False."""
        event_id = check_text(_EVENTS, "id", f"{run_id}:{seq}", allow_empty=False)
        statement = self._insert_checked
        try:
            # idempotent=False (issue 6): after a lost reply the event may be stored already; a
            # second run would then report the number taken and the event would be stored again
            # under the next number. The executor reconnects but raises ConnectionLostError instead.
            cursor = self._execute(statement.sql, statement.params(
                {"id": event_id, "run": run_id, "seq": seq, "ts": stamp, "event": body, "prev": seq - 1}),
                idempotent=False, resolve=lambda: self._read_back(run_id, seq, body))
        except peewee.IntegrityError:  # MySQL: a duplicate raises rather than being skipped
            return False
        return bool(cursor.rowcount == 1)

    def _read_back(self, run_id: str, seq: int, body: str) -> Optional[Applied]:
        """After a lost reply to the insert of event `seq`: Applied(1) if it is stored,
        Applied(0) if another event holds the number, None if nothing does (run it again)."""
        row = first_row(self._execute(self._event_at.sql, self._event_at.params({"run": run_id, "seq": seq})))
        if row is None:
            return None
        return Applied(1 if self._load_json(row[0]) == json.loads(body) else 0)

    def _stored_as(self, run_id: str, seq: int, body: str) -> bool:
        """True when event `seq` of the stream is the event `body` (read back after a lost COMMIT)."""
        if seq <= 0:
            return False
        outcome = self._read_back(run_id, seq, body)
        return outcome is not None and outcome.rowcount == 1

    def _insert_rest(self, run_id: str, seq: int, encoded: Sequence[Tuple[Any, str]]) -> None:
        """Store events numbered from `seq` with multi-row INSERTs (inside append_many's transaction)."""
        rows: List[Any] = []
        count = size = 0
        for stamp, body in encoded:
            rows.extend((check_text(_EVENTS, "id", f"{run_id}:{seq}", allow_empty=False), run_id, seq, stamp,
                         body))
            seq += 1
            count += 1
            size += len(body)
            if count == _CHUNK_ROWS or size >= _CHUNK_BYTES:
                self._insert_rows(run_id, count, rows)
                rows, count, size = [], 0, 0
        if count:
            self._insert_rows(run_id, count, rows)

    def _insert_rows(self, run_id: str, count: int, params: List[Any]) -> None:
        try:
            stored = self._execute(self._rows_statement(count), params).rowcount
        except peewee.IntegrityError as exc:
            raise self._taken(run_id, params, exc) from exc
        if stored != count:
            raise self._taken(run_id, params, None)

    def _rows_statement(self, count: int) -> str:
        sql = self._rows_sql.get(count)
        if sql is None:
            E = self._event_model
            names = ("id", "run", "seq", "ts", "event")
            rows = [{f: marker(f"{n}{i}") for f, n in zip(self._event_fields, names)} for i in range(count)]
            statement = compile_statement(self._db, self._dialect.skip_duplicates(E.insert_many(rows)).returning())
            expected = tuple(f"{n}{i}" for i in range(count) for n in names)
            if statement.names != expected:
                raise AssertionError(f"multi-row insert parameters out of order: {statement.plan[:10]}")
            sql = statement.sql
            with self._rows_lock:
                self._rows_sql[count] = sql
        return sql

    def _taken(self, run_id: str, params: List[Any], exc: Optional[Exception]) -> ConflictError:
        first, last = params[2], params[-3]
        detail = f": {exc}" if exc is not None else ""
        return ConflictError(f"{_EVENTS}: cannot store events {first}..{last} of stream {run_id!r}: a row with "
                             f"one of their ids ({run_id}:{first} ...) already exists and was not written by "
                             f"this stream's appenders{detail}")

    def _stuck(self, run_id: str, seq: int) -> ConflictError:
        return ConflictError(
            f"{_EVENTS}: cannot store event {seq} of stream {run_id!r}: the row id {run_id}:{seq} is taken by a "
            "row that is not part of this stream, or (inside a transaction on MySQL/MariaDB) another writer "
            "appended to the stream after the transaction began")

    def _last_event(self, run_id: str) -> int:
        """The last seq of the stream (0 when it has none), or NotFoundError when there is no stream."""
        row = first_row(self._execute(self._last_seq.sql, self._last_seq.params({"run": run_id})))
        if row is None:
            raise NotFoundError(_STREAMS, run_id,
                                f"streams: no stream for run {run_id!r}; open it first (storage.streams.open)")
        return int(row[0])

    def _remember(self, run_id: str, next_seq: int) -> None:
        if len(self._next) >= _MAX_REMEMBERED:
            self._next.clear()
        self._next[run_id] = next_seq

    def _execute(self, sql: str, params: Any, idempotent: bool = True,
                 resolve: Optional[Callable[[], Any]] = None) -> Any:
        try:
            return self._executor.execute(sql, params, idempotent=idempotent, resolve=resolve)
        except peewee.OperationalError as exc:
            if self._dialect.rejected_json_column(exc) is None:
                raise
            raise json_refused(_EVENTS, "event", exc) from exc

    # -- following ------------------------------------------------------------------------

    def resume(self, run_id: str, after_seq: int = 0, *, poll_interval: float = 0.025,
               timeout: Optional[float] = None, stop: Optional[threading.Event] = None
               ) -> Iterator[Dict[str, Any]]:
        """Follow the stream of `run_id`: yield each event with seq > `after_seq`, in order.

        Each item is the stored event object plus its ``"seq"``. The iterator ends when
        the stream is closed and every event has been yielded, ends quietly when the stream
        is deleted, and stops when `stop` is set or `timeout` seconds have passed. It polls
        every `poll_interval` seconds while there is nothing new; between polls it holds no
        transaction, and on a pooled database it returns the connection it took to the pool.

        Call it outside a transaction: inside one, MySQL/MariaDB (REPEATABLE READ) would keep
        showing the snapshot the transaction began with.

        :raises NotFoundError: (at once) the stream does not exist.
        """
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise ValueError(f"after_seq must be a non-negative integer, got {after_seq!r:.80}")
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or \
                not poll_interval > 0:
            raise ValueError(f"poll_interval must be a positive number of seconds, got {poll_interval!r:.80}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise ValueError(f"timeout must be None or a non-negative number of seconds, got {timeout!r:.80}")
        deadline = None if timeout is None else time.monotonic() + timeout
        first = self._poll(run_id, after_seq) if storable_key(run_id) else None
        if first is None:
            raise NotFoundError(_STREAMS, run_id, f"streams: no stream for run {run_id!r} to resume")
        return self._follow(run_id, after_seq, first, poll_interval, deadline, stop)

    def _follow(self, run_id: str, cursor: int, batch: Tuple[str, int, List[Tuple[int, Any]]],
                poll_interval: float, deadline: Optional[float], stop: Optional[threading.Event]
                ) -> Iterator[Dict[str, Any]]:
        load = self._load_json
        while True:
            status, last, events = batch
            window_end = cursor + POLL_BATCH
            for seq, raw in events:
                if stop is not None and stop.is_set():
                    return
                item = load(raw)
                item["seq"] = seq
                cursor = seq
                yield item
            if not events and last > window_end:
                cursor = window_end  # a gap in the numbering: nothing to read in this window
            # Status and last seq come from the same snapshot as the events: once closed and
            # read up to its last seq, the stream is drained.
            caught_up = cursor >= last
            if caught_up and status != "open":
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            if caught_up:
                pause = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
                if stop is not None:
                    if stop.wait(max(pause, 0)):
                        return
                elif pause > 0:
                    time.sleep(pause)
            elif stop is not None and stop.is_set():
                return
            polled = self._poll(run_id, cursor)
            if polled is None:
                return  # the stream was deleted
            batch = polled

    def _poll(self, run_id: str, after: int) -> Optional[Tuple[str, int, List[Tuple[int, Any]]]]:
        """(status, last seq, [(seq, event JSON), ...] in (after, after + POLL_BATCH]), or None
        when the stream does not exist."""
        db = self._db
        opened = self._pooled and db.is_closed()
        try:
            rows = self._executor.execute(self._poll_sql.sql, self._poll_sql.params(
                {"run": run_id, "run2": run_id, "after": after, "upto": after + POLL_BATCH})).fetchall()
        finally:
            if opened and not db.is_closed() and not db.in_transaction():
                db.close()  # back to the pool: an idle follower must not hold a connection
        if not rows:
            return None
        events = [(seq, event) for _status, _last, seq, event in rows if seq is not None]
        events.sort(key=_first)  # (no ORDER BY: it costs MariaDB a temporary table per poll)
        return rows[0][0], rows[0][1] or 0, events


def _first(item: Tuple[int, Any]) -> int:
    return item[0]


def _backoff(attempt: int) -> None:
    """A short random pause after losing a race, longer the more often it is lost."""
    if attempt >= 2:
        time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
