"""The stream poller: one background thread per storage reads every followed stream.

The followers register watches (watches.py) and wait on them; the poller thread, started by
the first follower and ending `LINGER` seconds after the last one left, sleeps until a poke
(an append or close by this process), news from the database's wake-up source (PostgreSQL's
NOTIFY) or the timed poll is due, then reads the streams in chunks with the dialect's reader
(`Dialect.poll_reader`, dialects/polling.py) and hands the rows to the watches
(delivery.py). A fork is handled by the fork guard (forkguard.py). See followers.py for the
whole picture.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

import peewee
from playhouse.pool import PooledDatabase

from . import forkguard
from .delivery import deliver
from .dialects.polling import WakeSource
from .driver_errors import first_line
from .errors import ConnectionLostError, PoolExhaustedError
from .liveness import Liveness
from .watches import LINGER, Watch, Watches

if TYPE_CHECKING:
    from .executor import Executor
    from .models import Models

logger = logging.getLogger(__name__)

__all__ = ["Poller", "PUSH_FALLBACK"]

#: Seconds between timed polls while the wake-up source works (PostgreSQL's LISTEN/NOTIFY).
PUSH_FALLBACK = 0.5


class _Turn:
    """The poller thread's own bookkeeping between rounds."""

    __slots__ = ("next_full", "idle_since", "failures", "fallback")

    def __init__(self) -> None:
        self.next_full = 0.0  # when the next timed round of every stream is due
        self.idle_since: Optional[float] = None  # since when no follower is left
        self.failures = 0  # rounds failed in a row (they back off)
        self.fallback = 0.0  # seconds from this timed round to the next

    def pause(self, now: float, interval: float, stoppable: int, listening: bool) -> float:
        """Seconds to sleep: until the timed round (or the end of lingering), at most `interval`
        while followers have stop events to watch, at least a growing back-off after failures."""
        self.fallback = max(interval, PUSH_FALLBACK) if listening else interval
        pause = self.next_full - now if self.idle_since is None else LINGER - (now - self.idle_since)
        if stoppable:
            pause = min(pause, interval)
        if self.failures:
            pause = max(pause, min(0.05 * 2 ** min(self.failures, 5), 1.0))
        return pause


class Poller:
    """The background thread that polls every followed stream of one storage (see the module doc)."""

    def __init__(self, executor: Executor, models: Models) -> None:
        self._executor = executor  # runs the poll statements on the poller thread's connection
        self._db: peewee.Database = executor.database
        self._dialect = executor.dialect
        self._models = models
        #: An in-memory SQLite database is per connection: followers poll on their own thread.
        self.inline = self._dialect.per_connection_database()
        self.polls = 0  # statements run (for tests and benchmarks)
        self._liveness = Liveness(executor, models)
        self._fresh()
        forkguard.register(self)

    def _fresh(self) -> None:
        """Everything a forked child must not share with its parent, new (see `after_fork`)."""
        #: Held while the poller runs SQL, where the dialect says a fork must wait for that.
        self.busy = threading.Lock()
        self._watches = Watches()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._conn: Any = None  # the driver connection the reader set up
        self.reader = self._dialect.poll_reader(self._executor, self._models, self._connect)

    # -- the followers' side ------------------------------------------------------------------

    @property
    def followed(self) -> Dict[str, List[Watch]]:
        """Run id -> watches (read without the lock on the append path: a stale answer costs a poll)."""
        return self._watches.by_run

    @property
    def liveness_checks(self) -> int:
        """Liveness statements run (for tests and benchmarks)."""
        return self._liveness.checks

    @property
    def listening(self) -> bool:
        """True while other processes' appends reach this poller at once (PostgreSQL's NOTIFY)."""
        return self.reader.wake.listening

    def follow(self, run_id: str, after_seq: int, interval: float, stop: Optional[threading.Event],
               stale_after: Optional[float] = None) -> Watch:
        """Register a follower and wait until the poller has looked at its stream once.

        :raises NotFoundError: through the caller, when the stream does not exist (see Streams.resume).
        """
        watch = Watch(run_id, after_seq, interval, stop, stale_after)
        watches = self._watches
        with watches.lock:
            watches.add(watch)
            if stale_after is not None:
                self._liveness.newcomer()
            if not self.inline:
                watches.dirty.add(run_id)
                self._start()
                watches.bell.ring()
        if self.inline:
            try:
                self._poll({run_id})
            except BaseException:
                self.leave(watch)
                raise
            return watch
        while not watch.checked and watch.error is None:
            watch.event.wait(1.0)
            watch.event.clear()
            if not watch.checked and watch.error is None:
                with watches.lock:
                    self._start()  # (cannot stop while it has watches; belt and braces)
        return watch

    def leave(self, watch: Watch) -> None:
        """Forget a follower (it ended, was closed, or was garbage-collected)."""
        self._watches.remove(watch)

    def wait(self, watch: Watch, timeout: float) -> None:
        """Block the follower until its watch changes or `timeout` passes (< 0: poke, no wait)."""
        if timeout < 0:
            if not self.inline:
                self.poke(watch.run_id)
            return
        if not self.inline:
            watch.event.wait(timeout)
            return
        pause = min(timeout, watch.interval)
        if watch.stop is not None:
            watch.stop.wait(pause)
        else:
            time.sleep(pause)
        if watch.stop is None or not watch.stop.is_set():
            self._poll({watch.run_id})

    def poke(self, run_id: str) -> None:
        """Something happened to stream `run_id` (appended, closed): poll it now if it is followed."""
        self._watches.poke(run_id)

    def poke_all(self) -> None:
        """Something may have happened to any followed stream (missed notifications): poll them all now."""
        self._watches.poke_all()

    def _start(self) -> None:  # with the lock held
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="better-agent-poller", daemon=True)
            self._thread.start()

    # -- the poller thread ----------------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        turn = _Turn()
        try:
            while self._turn(me, turn):
                pass
        except BaseException:  # pragma: no cover - a bug; followers must not hang on a dead poller
            logger.exception("stream poller crashed")
            with self._watches.lock:
                if self._thread is me:
                    self._thread = None
            self._watches.crash()
            raise
        finally:
            self._release()

    def _turn(self, me: threading.Thread, turn: _Turn) -> bool:
        """Sleep until something is due, then poll it; False when the thread is to end."""
        pause = self._pause(me, turn)
        if pause is None:
            return False
        _sleep(self._watches, self.reader.wake, pause)
        now = time.monotonic()
        watches = self._watches
        with watches.lock:
            watches.wake_stopped()
            full = now >= turn.next_full and bool(watches.by_run)
            if full:
                turn.next_full = now + turn.fallback
            targets = watches.dirty & watches.by_run.keys()
            watches.dirty.clear()
        if targets or full:
            try:
                self._poll(targets, full)
                turn.failures = 0
            except Exception as exc:
                turn.failures += 1
                self.reader.failed()
                self._failed(set(watches.by_run) if full else targets, exc)
        return True

    def _pause(self, me: threading.Thread, turn: _Turn) -> Optional[float]:
        """How long to sleep before the next round; None when the thread is to end (replaced, or
        lingered `LINGER` seconds without followers)."""
        now = time.monotonic()
        watches = self._watches
        with watches.lock:
            if self._thread is not me:
                return None
            if watches.by_run:
                turn.idle_since = None
                interval = watches.interval
            else:
                turn.idle_since = now if turn.idle_since is None else turn.idle_since
                if now - turn.idle_since >= LINGER:
                    self._thread = None
                    return None
                interval = LINGER
            stoppable = watches.stoppable
        return turn.pause(now, interval, stoppable, self.listening)

    def _connect(self) -> Any:
        """The poller's connection, set up by the reader (LISTEN, PREPARE) whenever it is a new one."""
        conn = self._executor.connection()
        if conn is not self._conn:
            if self._conn is not None:  # reconnected: what happened meanwhile woke nobody here
                self.poke_all()
            self._conn = conn
            self.reader.connected(conn)
        return conn

    def _release(self) -> None:
        """Give the connection back (a pooled one clean: no LISTEN, no prepared statement)."""
        db, conn = self._db, self._conn
        self._conn = None
        self.reader.wake.stop()
        if db.is_closed() or os.getpid() != self._pid or self.inline:
            return
        with self._statements():
            try:
                if isinstance(db, PooledDatabase) and not db.in_transaction():
                    self.reader.release(conn)
            except Exception:
                logger.debug("stream poller: cleaning up the connection failed", exc_info=True)
            with contextlib.suppress(Exception):
                db.close()

    def _statements(self) -> contextlib.AbstractContextManager[Any]:
        """Around the poller's SQL: holds `busy`, which a fork waits for (forkguard.py), where the
        dialect says a fork must wait (SQLite). Not on a network server, where a poller may wait
        out a reconnect window in there: a fork would wait with it."""
        return self.busy if self._dialect.fork_waits_for_statements else contextlib.nullcontext()

    def _failed(self, targets: Set[str], exc: Exception) -> None:
        """A poll failed: followers not yet started get the error; the others just wait longer,
        unless it is not a lost connection (then they get it too: retrying would not help)."""
        lost = isinstance(exc, (ConnectionLostError, PoolExhaustedError)) or (
            isinstance(exc, (peewee.OperationalError, peewee.InterfaceError))
            and self._dialect.is_connection_lost(exc))
        if lost:
            # (The executor has dropped a dead connection already: the next round connects anew,
            # and the reader sets the new one up.)
            logger.warning("stream poller: %s; retrying",
                           first_line(exc))
            self._conn = None
            self.reader.wake.stop()
        else:
            logger.error("stream poller: polling failed: %s", exc)
        self._watches.fail(targets, exc, lost)

    # -- a round ----------------------------------------------------------------------------------

    def _poll(self, targets: Set[str], full: bool = False) -> None:
        """One round: read the `targets` streams, or (`full`) every followed stream, in chunks,
        and feed their watches."""
        with self._statements():
            self._connect()
            # (Before the data_version shortcut: a dead worker writes nothing.)
            if (full or self.inline) and self._liveness.due():
                targets = targets | self._liveness.check(self._watches)
            if full:
                full = self.reader.timed_round(bool(self._watches.unchecked))
            for chunk, window, params in self._watches.plan_round(self.reader, targets, full):
                self.polls += 1
                rows = self.reader.read(params)
                if rows or self._watches.unchecked or self._watches.stale_runs:
                    deliver(self._watches, chunk, window, rows)

    # -- fork --------------------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child (the fork guard calls it): forget the parent's thread, watches and
        pipe, and make its connection inert."""
        conn = self._conn
        if conn is not None:
            fd: Optional[int] = None
            with contextlib.suppress(Exception):
                fd = self._dialect.driver_fd(conn)
            forkguard.make_inert(conn, fd)
        self._watches.bell.close()  # (the pipe is shared with the parent)
        self._fresh()
        # peewee's per-thread state of the poller thread may hold the same connection: a new
        # poller thread in the child gets a fresh state, and this one is never used again.


def _sleep(watches: Watches, wake: WakeSource, pause: float) -> None:
    """Wait up to `pause` seconds for a poke (the doorbell) or news from the wake-up source."""
    poll = select.poll()
    poll.register(watches.bell.fileno(), select.POLLIN)
    fd = wake.fileno()
    if fd is not None:
        with contextlib.suppress(Exception):
            poll.register(fd, select.POLLIN)
    if _news(watches, wake):  # news that came in with a poll's reply
        pause = 0
    if pause > 0:
        with contextlib.suppress(InterruptedError):
            poll.poll(pause * 1000)
    with watches.lock:
        watches.bell.answer()
    _news(watches, wake)


def _news(watches: Watches, wake: WakeSource) -> bool:
    """Mark the streams the wake-up source has news for; False when none had come."""
    news = wake.take()
    if news is None:
        return False
    runs, everything = news
    watches.mark(set(watches.by_run) if everything else runs & watches.by_run.keys())
    return True
