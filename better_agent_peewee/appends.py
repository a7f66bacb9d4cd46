"""How `storage.streams.append` numbers events: the next seq remembered per stream, this process's
writers taking turns, and the tries until a number holds ("How streams.append flows" in
docs/architecture.md; the rows themselves are events.py's).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

import peewee

from .errors import ConflictError, ConnectionLostError, ContentionError
from .events import Encoded, EventRows
from .executor import read_back_after
from .records import check_key
from .tables import Tables

logger = logging.getLogger(__name__)

__all__ = ["Appends", "MAX_ATTEMPTS", "MAX_TRANSIENT"]

_EVENTS = "streamEvents"

#: Attempts before an append gives up; each failed attempt means another writer got the number.
MAX_ATTEMPTS = 1000
#: Of those, how many may end in a deadlock, serialization failure or (SQLite) busy timeout.
MAX_TRANSIENT = 20
#: Streams whose next seq an `Appends` remembers before it forgets them all.
_MAX_REMEMBERED = 10_000
#: Locks that this process's appenders to the same stream take turns on (streams share them).
_TURNS = 64


class _Tries:
    """One append's failed tries: the seq that failed last, the conflicts in a row at it, and since
    when the connection has been lost."""

    __slots__ = ("failed", "transient", "lost_since")

    def __init__(self) -> None:
        self.failed: Optional[int] = None
        self.transient = 0
        self.lost_since: Optional[float] = None

    def taken(self, seq: int) -> None:
        """Another writer took `seq` (or the stream is gone)."""
        self.failed, self.transient = seq, 0

    def conflicted(self, run_id: str, seq: int, exc: peewee.DatabaseError) -> None:
        """A conflict at `seq`: another writer (or node) got in first. Go on while the stream moves
        on; ContentionError after MAX_TRANSIENT conflicts in a row at one number."""
        self.transient = 1 if seq != self.failed else self.transient + 1
        self.failed = seq
        if self.transient > MAX_TRANSIENT:
            raise ContentionError(f"{_EVENTS}: appending to stream {run_id!r} conflicted "
                                  f"{self.transient} times at seq {seq} (last: {exc}); nothing was "
                                  f"stored: retry later",
                                  getattr(exc, "orig", exc)) from exc

    def lost_too_long(self, window: float) -> bool:
        """The connection is lost again: True once it has been lost for more than `window` seconds."""
        now = time.monotonic()
        self.lost_since = self.lost_since or now
        return now - self.lost_since > window


class Appends:
    """The appends of `storage.streams`: each event under the next seq of its stream, no gap, no
    duplicate, with any number of writers."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._db: peewee.Database = tables.executor.database
        self._events = EventRows(tables)
        self._encode = self._events.encode
        self._insert_first = self._events.insert_first
        # run id -> the seq its next event most likely gets. Only a hint: the insert checks it.
        self._next: Dict[str, int] = {}
        # This process's appenders to one stream take turns on a lock of their own, so they
        # neither race each other for numbers nor wait on the database's locks (on SQLite,
        # whose busy handler grants no order, all appenders share one lock: one writer anyway).
        # Other processes still race; the insert's check referees those.
        turns = 1 if tables.executor.dialect.single_writer else _TURNS
        self._turns = [threading.Lock() for _ in range(turns)]

    def append(self, run_id: str, event: Mapping[str, Any]) -> int:
        """Store `event` as the next event of the stream of `run_id`; its seq (`Streams.append`)."""
        run_id = check_key(_EVENTS, "runId", run_id)
        encoded = self._encode(event)
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
                return seq
            # Anything else (no number remembered, taken, a conflict): the general path, which
            # reads the last seq afresh.
            self._next.pop(run_id, None)
        return self._store(run_id, [encoded])[0]

    def append_many(self, run_id: str, events: Iterable[Mapping[str, Any]]) -> List[int]:
        """Store `events` as the next events of the stream of `run_id`, all or none; their seqs
        (`Streams.append_many`)."""
        run_id = check_key(_EVENTS, "runId", run_id)
        encoded = [self._encode(event, i) for i, event in enumerate(events)]
        if not encoded:
            self._events.last_seq_of(run_id)  # still say so when the stream does not exist
            return []
        return self._store(run_id, encoded, batch=True)

    def remember(self, run_id: str, next_seq: int) -> None:
        """The next event of stream `run_id` most likely gets `next_seq` (a new stream: 1)."""
        if len(self._next) >= _MAX_REMEMBERED:
            self._next.clear()
        self._next[run_id] = next_seq

    def _store(self, run_id: str, encoded: List[Encoded], batch: bool = False) -> List[int]:
        """Store encoded events as the next of the stream, trying numbers until one holds."""
        tries = _Tries()
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
                    if not seq or seq == tries.failed:
                        seq = self._fresh_seq(run_id, tries)
                    if batch:
                        stored = self._events.insert_batch(run_id, seq, encoded)
                    else:
                        stored = self._insert_first(run_id, seq, *encoded[0])
            except ConnectionLostError as exc:
                # append_many's own transaction lost its connection: rolled back, or (lost at
                # COMMIT) maybe committed. Settle it by reading back the first event, then go on.
                if (self._db.in_transaction() or not batch
                        or tries.lost_too_long(self._executor.reconnect_window)):
                    raise
                self._next.pop(run_id, None)
                if exc.maybe_applied and read_back_after(
                        exc, functools.partial(self._events.stored_as, run_id, seq, encoded[0][1])):
                    self.remember(run_id, seq + len(encoded))
                    return list(range(seq, seq + len(encoded)))
                continue
            except peewee.DatabaseError as exc:
                if self._db.in_transaction() or not self._executor.rerunnable(exc):
                    raise
                tries.conflicted(run_id, seq, exc)
                logger.debug("append to %r: %s; retrying", run_id, exc)
            else:
                if stored:
                    self.remember(run_id, seq + len(encoded))
                    return list(range(seq, seq + len(encoded)))
                tries.taken(seq)  # another writer took `seq` (or the stream is gone): look again
            self._next.pop(run_id, None)
            _backoff(attempt)
        raise ConflictError(f"{_EVENTS}: gave up appending to stream {run_id!r} after {MAX_ATTEMPTS} "
                            "attempts; other writers took every number tried")

    def _fresh_seq(self, run_id: str, tries: _Tries) -> int:
        """The stream's last seq + 1, read afresh; ConflictError when that is the number that just
        failed without a conflict (the number is right, yet the row cannot go in)."""
        seq = self._events.last_seq_of(run_id) + 1
        if seq == tries.failed and not tries.transient:
            raise self._events.stuck(run_id, seq)
        return seq


def _backoff(attempt: int) -> None:
    """A short random pause after losing a race, longer the more often it is lost."""
    if attempt >= 2:
        time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
