"""Replayable event streams: open, append, close and follow the events of a run.

The flow is "Streams" in docs/contract.md; the append protocol, step by step, is
"How streams.append flows" in docs/architecture.md.

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

`resume` follows a stream without a connection of its own: the storage's one poller
thread (`poller.Poller`) reads every followed stream of the process together, and is
woken at once by this process's appends (and, on PostgreSQL, by other processes' through
LISTEN/NOTIFY). A poll reads, in one snapshot per statement, each stream's status, its
last seq and the events in the next window of seqs after the last one seen (a range scan
on (run_id, seq) bounded on both sides), so its cost does not grow with the streams' length.
An append to a closed stream is refused, so a follower that saw the close has every event;
closing a closed stream again is allowed and only sets its updatedAt and closedAt anew.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import peewee

from .checks import is_int
from .errors import ConflictError, ConnectionLostError, ContentionError, NotFoundError, RecordError
from .executor import Applied, json_refused, read_back_after
from .followers import HEARTBEAT, POLL_BATCH, STALE_AFTER, Follower
from .poller import Poller
from .query import MultiRowInsert, compile_statement, first_row, marker
from .records import STREAM_STATUSES, check_key, check_text, check_ts, make_json_check, now_ms, storable_key
from .tables import TableAdapter, Tables

logger = logging.getLogger(__name__)

__all__ = ["Streams", "Follower", "HEARTBEAT", "POLL_BATCH"]

_EVENTS = "streamEvents"
_STREAMS = "streams"
_CLOSED_STATUSES = tuple(s for s in STREAM_STATUSES if s != "open")

#: Attempts before an append gives up; each failed attempt means another writer got the number.
MAX_ATTEMPTS = 1000
#: Of those, how many may end in a deadlock, serialization failure or (SQLite) busy timeout.
MAX_TRANSIENT = 20
#: Streams whose next seq a `Streams` remembers before it forgets them all.
_MAX_REMEMBERED = 10_000
#: Locks that this process's appenders to the same stream take turns on (streams share them).
_TURNS = 64


class _SeqTaken(Exception):
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
        # run id -> the seq its next event most likely gets. Only a hint: the insert checks it.
        self._next: Dict[str, int] = {}
        # This process's appenders to one stream take turns on a lock of their own, so they
        # neither race each other for numbers nor wait on the database's locks (on SQLite,
        # whose busy handler grants no order, all appenders share one lock: one writer anyway).
        # Other processes still race; the insert's check referees those.
        self._turns = [threading.Lock() for _ in range(1 if self._dialect.single_writer else _TURNS)]

        d = self._dialect
        S, E = tables.models.stream, tables.models.stream_event
        self._models = tables.models
        self._event_fields = [E.id, E.run_id, E.seq, E.timestamp, E.event]

        # Constants are written into the SQL, not bound: fewer parameters for the driver to quote.
        last_seq = E.select(peewee.fn.COALESCE(peewee.fn.MAX(E.seq), peewee.SQL("0"))).where(
            E.run_id == marker("run"))
        # One event, stored only if its stream exists and `seq` follows the last event.
        checked = S.select(marker("id"), marker("run"), marker("seq"), marker("ts"),
                           d.json_param(marker("event"))).where(
            (S.id == marker("run")) & (last_seq == marker("prev")))
        checked = checked.where(S.status == peewee.SQL("'open'"))  # a closed stream takes no more events
        if d.stream_row_share_lock is not None:
            # Lock the stream row shared: a close racing this append waits for it to commit, or it
            # sees the close (READ COMMITTED re-reads the locked row) and stores nothing. Without
            # the lock an append begun before the close could commit after it, unseen by the
            # followers that ended at the close. (SQLite has one writer at a time anyway.)
            checked = checked.for_update(d.stream_row_share_lock)
        # On PostgreSQL the same statement NOTIFYs the pollers of all processes (Dialect.notify_sql).
        notify = d.notifies_appends
        insert = d.skip_duplicates(E.insert_from(checked, self._event_fields))
        statement = compile_statement(self._db, insert.returning(E.run_id) if notify else insert.returning())
        self._insert_checked = statement._replace(sql=d.notify_sql(statement.sql))
        # The status and last seq of a stream (0 when it has no event); no row when there is no stream.
        self._last_seq = compile_statement(
            self._db, S.select(S.status, last_seq).where(S.id == marker("run")))
        # Read-back after a lost reply: the event stored under (run, seq), if any.
        self._event_at = compile_statement(self._db, E.select(d.select_json(E.event)).where(
            (E.run_id == marker("run")) & (E.seq == marker("seq"))))
        close = S.update({S.status: marker("status"), S.updated_at: marker("now"),
                          S.closed_at: marker("now")}).where(S.id == marker("run"))
        statement = compile_statement(self._db, close.returning(S.id) if notify else close)
        self._close_sql = statement._replace(sql=d.notify_sql(statement.sql))

        # The rest of an append_many's events: a plain INSERT (a duplicate raises), since skipping
        # duplicates costs PostgreSQL a speculative insertion per row (about a third more per event).
        self._rows = MultiRowInsert(self._db, E, self._event_fields)
        self._poller: Optional[Poller] = None  # made by the first resume
        self._poller_lock = threading.Lock()

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

        Closing a stream that does not exist does nothing; closing a closed one sets its
        updatedAt and closedAt anew. Followers (`resume`) end once they have read every event.
        """
        if status not in _CLOSED_STATUSES or type(status) is not str:
            raise RecordError(_STREAMS, "status",
                              f"a stream is closed with one of {', '.join(_CLOSED_STATUSES)}, "
                              f"got {status!r:.80}")
        if not storable_key(run_id):  # no stream can have this id
            return
        self._execute(self._close_sql.sql, self._close_sql.params(
            {"status": status, "now": self._encode_ts(now_ms()), "run": run_id}), idempotent=True)
        poller = self._poller
        if poller is not None:
            poller.poke(run_id)  # followers in this process see it now

    # -- appending -----------------------------------------------------------------------

    def append(self, run_id: str, event: Mapping[str, Any]) -> int:
        """Store `event` as the next event of the stream of `run_id` and return its seq.

        The event's `timestamp` (epoch ms) is the record's timestamp when it is a number,
        else now. Safe under any number of concurrent appenders (threads or processes):
        seqs are 1, 2, 3 ... with no gap or duplicate. One statement in the common case.

        :raises NotFoundError: the stream does not exist (call `open` first).
        :raises ConflictError: the stream is closed (nothing is written).
        :raises RecordError: the event is not a JSON object every dialect can store.
        """
        run_id = check_key(_EVENTS, "runId", run_id)
        encoded = self._encode_event(event)
        if not self._db.in_transaction():
            # The common case first: one writer, the number known, stored at the first try.
            turn = self._turns[hash(run_id) % len(self._turns)]
            self._executor.connection()  # connect (or get a pooled connection) before queueing
            try:
                with turn:
                    seq = self._next.get(run_id)
                    stored = seq is not None and self._insert_first(run_id, seq, *encoded)
            except peewee.DatabaseError as exc:
                if not self._executor.rerunnable(exc) or isinstance(exc, ConnectionLostError):
                    raise
                stored = False  # a conflict: nothing was stored; the general path retries it
            if stored:
                assert seq is not None
                self._next[run_id] = seq + 1
                poller = self._poller
                if poller is not None:
                    poller.poke(run_id)
                return seq
            # Anything else (no number remembered, taken, a conflict): the general path, which
            # reads the last seq afresh.
            self._next.pop(run_id, None)
        return self._store(run_id, [encoded])[0]

    def append_many(self, run_id: str, events: Iterable[Mapping[str, Any]]) -> List[int]:
        """Store `events` as the next events of the stream of `run_id`, in one transaction.

        All are stored with consecutive seqs, or none is. Returns their seqs.

        :raises NotFoundError: the stream does not exist.
        :raises ConflictError: the stream is closed (nothing is written).
        :raises RecordError: an event cannot be stored (nothing is written).
        """
        run_id = check_key(_EVENTS, "runId", run_id)
        encoded = [self._encode_event(event, i) for i, event in enumerate(events)]
        if not encoded:
            self._last_seq_of(run_id)  # still say so when the stream does not exist
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
                        seq = self._last_seq_of(run_id) + 1
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
                if exc.maybe_applied and read_back_after(
                        exc, functools.partial(self._stored_as, run_id, seq, encoded[0][1])):
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
                    raise ContentionError(f"{_EVENTS}: appending to stream {run_id!r} conflicted "
                                          f"{transient} times at seq {seq} (last: {exc}); nothing was "
                                          f"stored: retry later",
                                          getattr(exc, "orig", exc)) from exc
                logger.debug("append to %r: %s; retrying", run_id, exc)
                self._next.pop(run_id, None)
                _backoff(attempt)
                continue
            if stored:
                self._remember(run_id, seq + len(encoded))
                poller = self._poller
                if poller is not None:
                    poller.poke(run_id)  # a follower in this process gets it now, not at the next poll
                return list(range(seq, seq + len(encoded)))
            # Another writer took `seq` (or the stream is gone): look again.
            failed, transient = seq, 0
            self._next.pop(run_id, None)
            _backoff(attempt)
        raise ConflictError(f"{_EVENTS}: gave up appending to stream {run_id!r} after {MAX_ATTEMPTS} "
                            "attempts; other writers took every number tried")

    def _insert_batch(self, run_id: str, seq: int, encoded: List[Tuple[Any, str]]) -> bool:
        """Store events numbered from `seq` in one transaction; False when `seq` is not next."""
        try:
            with self._executor.transaction():
                if not self._insert_first(run_id, seq, *encoded[0]):
                    raise _SeqTaken()
                # The first event holds `seq`: no writer following this protocol can store a
                # later one before this transaction commits, so the rest go in as they are.
                self._insert_rest(run_id, seq + 1, encoded[1:])
        except _SeqTaken:
            return False
        return True

    def _encode_event(self, event: Any, index: Optional[int] = None) -> Tuple[Any, str]:
        """(timestamp parameter, event JSON) for `event`, or RecordError naming what is wrong."""
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

    def _insert_first(self, run_id: str, seq: int, stamp: Any, body: str) -> bool:
        """Store one event as number `seq` if the stream exists and `seq` is next; else False."""
        event_id = check_text(_EVENTS, "id", f"{run_id}:{seq}", allow_empty=False)
        statement = self._insert_checked
        try:
            # idempotent=False: after a lost reply the event may be stored already; a
            # second run would then report the number taken and the event would be stored again
            # under the next number. So the executor reconnects and `_read_back` settles it instead.
            cursor = self._execute(statement.sql, statement.params(
                {"id": event_id, "run": run_id, "seq": seq, "ts": stamp, "event": body, "prev": seq - 1}),
                idempotent=False, resolve=lambda: self._read_back(run_id, seq, body))
        except peewee.IntegrityError:  # MySQL: a duplicate raises rather than being skipped
            return False
        return bool(cursor.rowcount == 1)

    def _read_back(self, run_id: str, seq: int, body: str) -> Optional[Applied]:
        """After a lost reply to the insert of event `seq`: Applied(1) if it is stored,
        Applied(0) if another event holds the number, None if nothing does (run it again)."""
        params = self._event_at.params({"run": run_id, "seq": seq})
        row = first_row(self._execute(self._event_at.sql, params, idempotent=True))
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

    def _stuck(self, run_id: str, seq: int) -> ConflictError:
        return ConflictError(
            f"{_EVENTS}: cannot store event {seq} of stream {run_id!r}: "
            f"the row id {run_id}:{seq} is taken by a "
            "row that is not part of this stream, or (inside a transaction on MySQL/MariaDB) another writer "
            "appended to the stream after the transaction began")

    def _last_seq_of(self, run_id: str) -> int:
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

    def _remember(self, run_id: str, next_seq: int) -> None:
        if len(self._next) >= _MAX_REMEMBERED:
            self._next.clear()
        self._next[run_id] = next_seq

    def _execute(self, sql: str, params: Any, *, idempotent: bool,
                 resolve: Optional[Callable[[], Any]] = None) -> Any:
        try:
            return self._executor.execute(sql, params, idempotent=idempotent, resolve=resolve)
        except peewee.OperationalError as exc:
            if self._dialect.rejected_json_column(exc) is None:
                raise
            raise json_refused(_EVENTS, "event", exc) from exc

    # -- following ------------------------------------------------------------------------

    def resume(self, run_id: str, after_seq: int = 0, *, poll_interval: float = 0.025,
               timeout: Optional[float] = None, stop: Optional[threading.Event] = None,
               heartbeat: Optional[float] = None, stale_after: Optional[float] = STALE_AFTER) -> Follower:
        """Follow the stream of `run_id`: yield each event with seq > `after_seq`, in order.

        Each item is the stored event object plus its ``"seq"``. The iterator ends when the
        stream is closed and every event stored before the close has been yielded, ends
        quietly when the stream is deleted, ends "stale" when the run still says running but
        has sent no heartbeat for `stale_after` seconds (its worker is presumed dead; None:
        never), and stops when `stop` is set or `timeout` seconds have passed; its ``reason``
        then says which ("closed", "deleted", "stale", "stopped", "timeout"). With `heartbeat`
        seconds it also yields `HEARTBEAT` (an empty dict: test ``item is HEARTBEAT``) after
        each such quiet spell.

        The follower holds no connection and runs no statement: the storage's poller thread
        reads all followed streams together on one connection, at once when this process
        appends or closes (on PostgreSQL, any process), else every `poll_interval` seconds
        (every ``followers.PUSH_FALLBACK`` seconds while PostgreSQL push works). It never
        holds a transaction between polls. A follower dropped without being closed costs
        nothing once garbage-collected.

        Call it outside a transaction: the poller sees only committed events.

        :raises NotFoundError: (at once) the stream does not exist.
        :raises ConnectionLostError: (at once) the database cannot be reached now; a follower
            already following waits through a lost connection instead.
        """
        if not is_int(after_seq) or after_seq < 0:
            raise ValueError(f"after_seq must be a non-negative integer, got {after_seq!r:.80}")
        if not is_int(poll_interval, or_float=True) or not poll_interval > 0:
            raise ValueError(f"poll_interval must be a positive number of seconds, got {poll_interval!r:.80}")
        if timeout is not None and (not is_int(timeout, or_float=True) or not timeout >= 0):
            raise ValueError(f"timeout must be None or a non-negative number of seconds, got {timeout!r:.80}")
        if heartbeat is not None and (not is_int(heartbeat, or_float=True) or not heartbeat > 0):
            raise ValueError(f"heartbeat must be None or a positive number of seconds, got {heartbeat!r:.80}")
        if stale_after is not None and (not is_int(stale_after, or_float=True) or not stale_after > 0):
            raise ValueError(f"stale_after must be None or a positive number of seconds, "
                             f"got {stale_after!r:.80}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not storable_key(run_id):
            raise NotFoundError(_STREAMS, run_id, f"streams: no stream for run {run_id!r} to resume")
        poller = self.poller()
        watch = poller.follow(run_id, after_seq, float(poll_interval), stop,
                              None if stale_after is None else float(stale_after))
        if watch.error is not None or (watch.end == "deleted" and not watch.queue):
            poller.leave(watch)
            if watch.error is not None:
                raise watch.error
            raise NotFoundError(_STREAMS, run_id, f"streams: no stream for run {run_id!r} to resume")
        return Follower(run_id, after_seq, self._load_json, deadline, stop,
                        None if heartbeat is None else float(heartbeat), watch, poller.wait, poller.leave)

    def poller(self) -> Poller:
        """This storage's poller (made on first use; a new one in a forked child)."""
        poller = self._poller
        if poller is None:
            with self._poller_lock:
                if self._poller is None:
                    self._poller = Poller(self._executor, self._models)
                poller = self._poller
        return poller


def _backoff(attempt: int) -> None:
    """A short random pause after losing a race, longer the more often it is lost."""
    if attempt >= 2:
        time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
