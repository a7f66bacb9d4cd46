"""Following streams: one background poller per storage serves every `resume` of the process.

A follower (the iterator `Streams.resume` returns) holds no connection and runs no
statement. It registers a watch -- run id, the last seq it has, a queue -- with the
storage's `Poller` and waits on it. The poller is one thread with one connection; it is
started by the first follower and ends shortly after the last one leaves. Each round it
reads every followed stream with one statement (per `STREAMS_PER_POLL` streams):

    the followed (run id, seq after which something is wanted) pairs, passed as ONE parameter
    (an array on PostgreSQL, a JSON array elsewhere, so the statement text never changes)
    LEFT JOIN streams            -> the status (NULL: the stream was deleted)
    the stream's last seq        -> one probe of the (run_id, seq) index
    LEFT JOIN stream_events      -> the events in a bounded window after that seq

and the server returns rows only for streams where something happened: an event after
the seq asked for, a status other than open, or no stream any more. An idle round
returns no row at all. Status, last seq and events come from one statement and so one
snapshot: a follower ends "closed" only after it has every event stored before the close.

MariaDB/MySQL reads an index range only for constant bounds, so a timed round there first
checks which streams have their next event (a point lookup each), then reads each of those
alone. The check of idle streams is a statement PREPAREd on the poller's connection with their
(run id, seq) pairs written in, EXECUTEd every round (`dialects.mysql.PreparedChecks`); the
streams' status (closes and deletes by other processes that append no event) is read every
`STATUS_PAUSE` seconds.

Wake-ups: an append or close by this process pokes the poller (a byte down a pipe), which
polls the streams poked right away. On PostgreSQL the poller also LISTENs, and appends
and closes NOTIFY in the statement that writes them (no extra round trip), so appends by
other processes arrive at once too; the timed poll then only backs that up (every
`PUSH_FALLBACK` seconds) for writers that do not notify. Elsewhere the timed poll, every
`poll_interval` of the most eager follower, is how other processes' appends are seen.

Dead workers: every `LIVENESS_PAUSE` seconds the poller also asks, in one statement per
`STREAMS_PER_POLL` followed runs (plain SQL on ``agent_runs``, the same on every database),
which of them are still ``running`` but have sent no heartbeat (``updatedAt``) for longer
than their followers' `stale_after`. Their followers take every event stored so far, then
end with reason ``"stale"`` (see liveness.py). Only runs that have heartbeat at least once
(``updatedAt`` after ``startedAt``) are judged: a writer that never heartbeats (Better
Agent's own runtime) is never called dead.

On SQLite a `fork()` waits until the poller is out of its statement (so the child inherits no
lock taken inside the database library, which runs in this process), and the child starts its
own poller with its own connection; the parent's inherited connection is made inert first, so
the child can never talk on it.

Where each part lives: this module, the follower (the iterator `resume` returns); watches.py,
the registry of followed streams; poller.py, the thread and its rounds; dialects/polling.py and
each dialect's module, the reader and the wake-up source of one database (the SQL above);
delivery.py, rows to watches; liveness.py, dead workers; forkguard.py, the fork.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, NoReturn, Optional

from .dialects.polling import POLL_BATCH, STREAMS_PER_POLL
from .liveness import LIVENESS_PAUSE, STALE_AFTER
from .poller import PUSH_FALLBACK
from .watches import Watch

__all__ = ["HEARTBEAT", "Follower", "POLL_BATCH", "PUSH_FALLBACK", "STREAMS_PER_POLL", "STALE_AFTER",
           "LIVENESS_PAUSE"]


class _Heartbeat(dict):  # type: ignore[type-arg]
    """The item a follower yields after `heartbeat` seconds without an event (test with `is`)."""

    def __repr__(self) -> str:
        return "HEARTBEAT"


#: What `resume(..., heartbeat=...)` yields while the stream is quiet: an empty dict, no "seq".
HEARTBEAT: Dict[str, Any] = _Heartbeat()


class Follower(Iterator[Dict[str, Any]]):
    """The iterator `storage.streams.resume` returns: each event (with its "seq") once, in order.

    ``reason`` is None while it runs and says why it ended: ``"closed"`` (the stream was
    closed and every event was yielded), ``"deleted"`` (the stream disappeared), ``"stale"``
    (the run still says running but its worker sent no heartbeat for `stale_after` seconds:
    presumed dead; every event stored was yielded), ``"timeout"`` or ``"stopped"`` (`stop`
    was set, or `close()` was called). ``last_seq`` is the seq of the last event yielded (or
    the `after_seq` it started from, but never beyond the stream's last event once it ended).
    """

    def __init__(self, run_id: str, after_seq: int, load: Callable[[Any], Any], deadline: Optional[float],
                 stop: Optional[threading.Event], heartbeat: Optional[float], watch: Watch,
                 wait: Callable[[Watch, float], None], leave: Callable[[Watch], None]) -> None:
        self.run_id = run_id
        self.last_seq = after_seq
        self.reason: Optional[str] = None
        self._load = load
        self._deadline = deadline
        self._stop = stop
        self._heartbeat = heartbeat
        self._beat_at = None if heartbeat is None else time.monotonic() + heartbeat
        self._watch: Optional[Watch] = watch
        self._wait = wait
        # Also when the follower is dropped without being closed: the poller forgets its watch.
        self._finalizer = weakref.finalize(self, leave, watch)

    def __iter__(self) -> Follower:
        return self

    def __next__(self) -> Dict[str, Any]:
        watch = self._watch
        if watch is None:
            raise StopIteration
        stop = self._stop
        while True:
            if stop is not None and stop.is_set():
                self._finish("stopped")
            if watch.queue:
                seq, raw = watch.queue.popleft()
                if not watch.queue and watch.full:
                    watch.full = False
                    watch.event.clear()
                    self._wait(watch, -1)  # drained: ask the poller for the next window
                item: Dict[str, Any] = self._load(raw)
                item["seq"] = seq
                self.last_seq = seq
                if self._beat_at is not None:
                    self._beat_at = time.monotonic() + self._heartbeat  # type: ignore[operator]
                return item
            if watch.error is not None:
                error, watch.error = watch.error, None
                self._leave(None)
                raise error
            if watch.end is not None:
                if watch.last is not None and self.last_seq > watch.last:
                    self.last_seq = watch.last  # (after_seq was beyond the end: say where it ends)
                self._finish(watch.end)
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                self._finish("timeout")
            if self._beat_at is not None and now >= self._beat_at:
                self._beat_at = now + self._heartbeat  # type: ignore[operator]
                return HEARTBEAT
            pause = min(t for t in (self._deadline, self._beat_at, now + 3600.0) if t is not None) - now
            watch.event.clear()
            if watch.queue or watch.end is not None or watch.error is not None:
                continue  # arrived between the checks above and the clear
            try:
                self._wait(watch, pause)
            except BaseException:  # (polling on this thread: an in-memory SQLite database)
                self._leave(None)
                raise

    def _finish(self, reason: Optional[str]) -> NoReturn:
        self._leave(reason)
        raise StopIteration

    def _leave(self, reason: Optional[str]) -> None:
        self.reason = reason
        self._watch = None
        self._finalizer()

    def close(self) -> None:
        """Stop following (``reason`` becomes "stopped" unless it had ended already)."""
        if self._watch is not None:
            self.reason = "stopped"
            self._watch = None
            self._finalizer()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
