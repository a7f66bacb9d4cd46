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
number per stream (appends.py; the statements are events.py's), so the common case
(one writer per stream) is that single statement: one round trip per event. Threads of
one process appending to the same stream take turns on a lock first, so only other
processes ever make an append retry.

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

import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

from .appends import MAX_ATTEMPTS, MAX_TRANSIENT, Appends
from .checks import is_int
from .errors import NotFoundError, RecordError
from .followers import HEARTBEAT, POLL_BATCH, STALE_AFTER, Follower
from .poller import Poller
from .query import compile_statement, marker
from .records import STREAM_STATUSES, now_ms, storable_key
from .tables import TableAdapter, Tables

# MAX_ATTEMPTS and MAX_TRANSIENT live in appends.py; imported from here, as before, they still are.
__all__ = ["Streams", "Follower", "HEARTBEAT", "POLL_BATCH", "MAX_ATTEMPTS", "MAX_TRANSIENT"]

_STREAMS = "streams"
_CLOSED_STATUSES = tuple(s for s in STREAM_STATUSES if s != "open")


class Streams:
    """Better Agent's stream store: `storage.streams`.

    Safe to share between threads; every method runs on the calling thread's connection.
    Appending is `appends.Appends`'s job; following, the poller's (`resume`).
    """

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._table: TableAdapter = tables.table(_STREAMS)
        self._encode_ts = tables.executor.dialect.encode_ts
        self._load_json = tables.executor.dialect.load_json
        self._models = tables.models
        self._appends = Appends(tables)
        d, S = tables.executor.dialect, tables.models.stream
        close = S.update({S.status: marker("status"), S.updated_at: marker("now"),
                          S.closed_at: marker("now")}).where(S.id == marker("run"))
        # On PostgreSQL the same statement NOTIFYs the pollers of all processes (Dialect.notify_sql).
        close = close.returning(S.id) if d.notifies_appends else close
        statement = compile_statement(tables.executor.database, close)
        self._close_sql = statement._replace(sql=d.notify_sql(statement.sql))
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
        self._appends.remember(run_id, 1)  # a new stream has no event; if it had, the first append finds out

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
        self._executor.execute(self._close_sql.sql, self._close_sql.params(
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
        seq = self._appends.append(run_id, event)
        poller = self._poller
        if poller is not None:
            poller.poke(run_id)  # a follower in this process gets it now, not at the next poll
        return seq

    def append_many(self, run_id: str, events: Iterable[Mapping[str, Any]]) -> List[int]:
        """Store `events` as the next events of the stream of `run_id`, in one transaction.

        All are stored with consecutive seqs, or none is. Returns their seqs.

        :raises NotFoundError: the stream does not exist.
        :raises ConflictError: the stream is closed (nothing is written).
        :raises RecordError: an event cannot be stored (nothing is written).
        """
        seqs = self._appends.append_many(run_id, events)
        poller = self._poller
        if poller is not None and seqs:
            poller.poke(run_id)
        return seqs

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

