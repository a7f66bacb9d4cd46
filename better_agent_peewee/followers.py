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

MariaDB/MySQL (`Dialect.polls_by_checks`) reads an index range only for constant bounds, so a
timed round there first checks which streams have their next event (a point lookup each),
then reads each of those alone. The check of idle streams is a statement PREPAREd on the
poller's connection with their (run id, seq) pairs written in, EXECUTEd every round (see
`Poller._check`); the streams' status (closes and deletes by other processes that append no
event) is read every `STATUS_PAUSE` seconds.

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
end with reason ``"stale"`` (see `Poller._check_alive`). Only runs that have heartbeat at
least once (``updatedAt`` after ``startedAt``) are judged: a writer that never heartbeats
(Better Agent's own runtime) is never called dead.

On SQLite a `fork()` waits until the poller is out of its statement (so the child inherits no
lock taken inside the database library, which runs in this process), and the child starts its
own poller with its own connection; the parent's inherited connection is made inert first, so
the child can never talk on it.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import select
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, NoReturn, Optional, Set, Tuple

import peewee
from playhouse.pool import PooledDatabase

from .errors import ConnectionLostError, PoolExhaustedError
from .timestamps import now_ms

if TYPE_CHECKING:
    from .dialects import Dialect
    from .executor import Executor
    from .models import Models

logger = logging.getLogger(__name__)

__all__ = ["HEARTBEAT", "Follower", "Poller", "POLL_BATCH", "PUSH_FALLBACK", "STREAMS_PER_POLL", "notify_sql",
           "in_memory_sqlite", "STALE_AFTER", "LIVENESS_PAUSE"]

#: Widest seq window a poll reads for one stream; more is read by the next poll, at once.
POLL_BATCH = 500
#: Most streams one poll statement reads; more followed streams take more statements per round.
STREAMS_PER_POLL = 500
#: MariaDB/MySQL: most streams one check statement asks about (it returns the run ids with news).
CHECKS_PER_POLL = 2000
#: About the most event rows one poll statement may return (the window shrinks as streams add up).
ROWS_PER_POLL = 10_000
#: MariaDB/MySQL: seconds between the timed checks that also read the streams' status (for closes
#: and deletes by other processes that append no event; the others look for new events only).
STATUS_PAUSE = 0.5
#: MariaDB/MySQL: fewest seconds between two PREPAREs of a chunk's timed check.
PREPARE_PAUSE = 1.0
#: Seconds between timed polls while PostgreSQL push (LISTEN/NOTIFY) works.
PUSH_FALLBACK = 0.5
#: Seconds without a heartbeat (the run's ``updatedAt``) after which a follower of a running run ends
#: "stale" (its worker is presumed dead): `resume`'s default `stale_after`. Tracked runs heartbeat every
#: ``tracking.HEARTBEAT_INTERVAL`` (10) seconds, so a follower of a killed worker ends within about
#: STALE_AFTER + LIVENESS_PAUSE seconds.
STALE_AFTER = 40.0
#: Seconds between two liveness checks of the followed runs (one statement per STREAMS_PER_POLL runs).
LIVENESS_PAUSE = 5.0
#: Fewest seconds between a liveness check and the next one that a new follower brings forward.
FIRST_LIVENESS = 1.0
#: Seconds the poller stays after its last follower left (a quick next `resume` reuses it).
LINGER = 1.0
#: The NOTIFY channel of appends and closes (payload: the run id; empty: "look at all").
CHANNEL = "better_agent_streams"
#: Longest run id sent as a NOTIFY payload (PostgreSQL allows under 8000 bytes).
_PAYLOAD_BYTES = 7000
_PREPARED = "better_agent_follow"
#: MariaDB/MySQL: the prepared statements (this, then the chunk's number) of the timed checks.
_CHECK_STATEMENT = "better_agent_check"

Row = Tuple[Any, ...]


class _Heartbeat(dict):  # type: ignore[type-arg]
    """The item a follower yields after `heartbeat` seconds without an event (test with `is`)."""

    def __repr__(self) -> str:
        return "HEARTBEAT"


#: What `resume(..., heartbeat=...)` yields while the stream is quiet: an empty dict, no "seq".
HEARTBEAT: Dict[str, Any] = _Heartbeat()


class _Watch:
    """What the poller knows about one follower; shared by the two threads."""

    __slots__ = ("run_id", "cursor", "queue", "end", "error", "checked", "event", "stop", "interval", "full",
                 "stale_after", "stale", "last", "__weakref__")

    def __init__(self, run_id: str, cursor: int, interval: float, stop: Optional[threading.Event],
                 stale_after: Optional[float] = None) -> None:
        self.run_id = run_id
        #: Every event with seq <= cursor is in `queue` or was taken from it (written by the poller only).
        self.cursor = cursor
        self.queue: Deque[Tuple[int, Any]] = collections.deque()
        self.end: Optional[str] = None  # "closed" / "deleted" / "stale", once the queue has everything
        self.error: Optional[BaseException] = None
        self.checked = False  # the poller has looked at the stream once (resume waits for that)
        self.event = threading.Event()
        self.stop = stop
        self.interval = interval
        self.full = False  # the queue holds a window's worth: not polled until the follower drains it
        self.stale_after = stale_after  # seconds without a heartbeat that make the run dead (None: never)
        self.stale = False  # the liveness check found the run dead: end "stale" once caught up
        self.last: Optional[int] = None  # the stream's last seq, as last read


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
                 stop: Optional[threading.Event], heartbeat: Optional[float], watch: _Watch,
                 wait: Callable[[_Watch, float], None], leave: Callable[[_Watch], None]) -> None:
        self.run_id = run_id
        self.last_seq = after_seq
        self.reason: Optional[str] = None
        self._load = load
        self._deadline = deadline
        self._stop = stop
        self._heartbeat = heartbeat
        self._beat_at = None if heartbeat is None else time.monotonic() + heartbeat
        self._watch: Optional[_Watch] = watch
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


class Poller:
    """The background thread that polls every followed stream of one storage (see the module doc)."""

    def __init__(self, executor: Executor, models: Models) -> None:
        self._storage = executor  # runs the poll statements on the poller thread's connection
        self._db: peewee.Database = executor.database
        self._dialect = executor.dialect
        self._lock = threading.Lock()
        #: Held while the poller runs SQL, where the dialect says a fork must wait for that
        #: (see `_before_fork`).
        self._busy = threading.Lock()
        self._watches: Dict[str, List[_Watch]] = {}
        self._dirty: Set[str] = set()
        self._stoppable = 0  # watches with a stop event: the poller checks those every tick
        self._interval = LINGER  # the shortest poll_interval of the followers
        self._unchecked = 0  # followers waiting for their first answer
        self._alive_at = 0.0  # when the next liveness check is due (`_check_alive`)
        self._alive_last = -1.0  # when the last one ran
        self.liveness_checks = 0  # liveness statements run (for tests and benchmarks)
        self._liveness = True  # False once agent_runs cannot be read here (the runs domain elsewhere)
        self._stale_runs: Set[str] = set()  # runs found dead whose followers have not ended yet
        # What a timed poll of every stream sends, kept while nothing changes (`_version`).
        self._version = 0
        self._plan: Optional[Tuple[int, List[Any]]] = None
        self._data_version: Any = None  # SQLite: PRAGMA data_version at the last timed poll
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._woken = False
        #: True while this poller's PostgreSQL connection LISTENs (then appends arrive as NOTIFY).
        self.listening = False
        self._conn: Any = None  # the driver connection LISTEN / PREPARE were done on
        self._prepare = self._dialect.prepares_polls
        self._sql = self._dialect.build_poll_sql(models)
        self._plain_sql = self._sql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
        self._one_sql = _one_sql(models)
        self._models = models
        self._status_at = 0.0  # MariaDB: when a timed check last read the status
        self._with_status = False  # MariaDB: this round's timed check reads the status
        self._check_sqls = {status: self._dialect.build_check_sql(models, status)
                            for status in (False, True)} if self._dialect.polls_by_checks else {}
        # MariaDB: per chunk of a timed check, its PREPAREd statement: the connection, the token,
        # and the pairs written into it (run id -> seq); and when the last PREPARE was.
        self._prepared: Dict[int, Tuple[Any, int, Dict[str, int]]] = {}
        self._prepared_at = -PREPARE_PAUSE
        self._prepare_checks = True  # (False once the server refused a PREPARE)
        #: Per chunk: its last entries, and those of them not as written into its statement.
        self._hot: Dict[int, Tuple[Any, List[Tuple[str, int, int]]]] = {}
        #: An in-memory SQLite database is per connection: followers poll on their own thread.
        self.inline = in_memory_sqlite(self._db)
        self.polls = 0  # statements run (for tests and benchmarks)
        self._fds = weakref.finalize(self, _close_fds, self._rfd, self._wfd)
        self._fds.atexit = False  # daemon poller threads may still be lingering at exit
        _POLLERS.add(self)

    # -- the followers' side ------------------------------------------------------------------

    @property
    def followed(self) -> Dict[str, List[_Watch]]:
        """Run id -> watches (read without the lock on the append path: a stale answer costs a poll)."""
        return self._watches

    def follow(self, run_id: str, after_seq: int, interval: float, stop: Optional[threading.Event],
               stale_after: Optional[float] = None) -> _Watch:
        """Register a follower and wait until the poller has looked at its stream once.

        :raises NotFoundError: through the caller, when the stream does not exist (see Streams.resume).
        """
        watch = _Watch(run_id, after_seq, interval, stop, stale_after)
        with self._lock:
            self._watches.setdefault(run_id, []).append(watch)
            if stop is not None:
                self._stoppable += 1
            self._interval = min(self._interval, interval) if len(self._watches) > 1 or \
                len(self._watches[run_id]) > 1 else interval
            self._unchecked += 1
            self._version += 1
            if stale_after is not None:  # a newcomer (a reconnecting browser) is judged soon
                self._alive_at = min(self._alive_at, self._alive_last + FIRST_LIVENESS)
            if not self.inline:
                self._dirty.add(run_id)
                self._start()
                self._wake()
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
                with self._lock:
                    self._start()  # (cannot stop while it has watches; belt and braces)
        return watch

    def leave(self, watch: _Watch) -> None:
        """Forget a follower (it ended, was closed, or was garbage-collected)."""
        with self._lock:
            watches = self._watches.get(watch.run_id)
            if watches is None or watch not in watches:
                return
            watches.remove(watch)
            if not watches:
                del self._watches[watch.run_id]
                self._stale_runs.discard(watch.run_id)
            if watch.stop is not None:
                self._stoppable -= 1
            if not watch.checked:
                self._unchecked -= 1
            self._version += 1
            if watch.interval <= self._interval:
                self._interval = min((w.interval for ws in self._watches.values() for w in ws),
                                     default=LINGER)
            if not self._watches:
                self._wake()  # so it starts lingering now

    def wait(self, watch: _Watch, timeout: float) -> None:
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
        if run_id in self._watches:
            with self._lock:
                self._dirty.add(run_id)
                self._version += 1
                self._wake()

    def poke_all(self) -> None:
        """Something may have happened to any followed stream (missed notifications): poll them all now."""
        with self._lock:
            self._dirty.update(self._watches)
            self._wake()

    def _wake(self) -> None:  # with the lock held
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wfd, b"\0")

    def _start(self) -> None:  # with the lock held
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="better-agent-poller", daemon=True)
            self._thread.start()

    # -- the poller thread ----------------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        next_full = 0.0
        idle_since: Optional[float] = None
        failures = 0
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    if self._thread is not me:
                        return
                    if self._watches:
                        idle_since = None
                        interval = self._interval
                    else:
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= LINGER:
                            self._thread = None
                            return
                        interval = LINGER
                    stoppable = self._stoppable
                fallback = max(interval, PUSH_FALLBACK) if self.listening else interval
                pause = next_full - now if idle_since is None else LINGER - (now - idle_since)
                if stoppable:
                    pause = min(pause, interval)
                if failures:
                    pause = max(pause, min(0.05 * 2 ** min(failures, 5), 1.0))
                self._sleep(pause)
                now = time.monotonic()
                with self._lock:
                    if self._stoppable:
                        for ws in self._watches.values():
                            for w in ws:
                                if w.stop is not None and w.stop.is_set():
                                    w.event.set()
                    full = now >= next_full and bool(self._watches)
                    if full:
                        next_full = now + fallback
                    targets = self._dirty & self._watches.keys()
                    self._dirty.clear()
                if not targets and not full:
                    continue
                try:
                    self._poll(targets, full)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    self._data_version = None
                    self._failed(set(self._watches) if full else targets, exc)
        except BaseException:  # pragma: no cover - a bug; followers must not hang on a dead poller
            logger.exception("stream poller crashed")
            with self._lock:
                if self._thread is me:
                    self._thread = None
                for ws in self._watches.values():
                    for w in ws:
                        w.error = RuntimeError("the stream poller crashed; see the log")
                        w.event.set()
            raise
        finally:
            self._release()

    def _sleep(self, pause: float) -> None:
        """Wait up to `pause` seconds for a poke (the pipe) or a NOTIFY (the connection's socket)."""
        poll = select.poll()
        poll.register(self._rfd, select.POLLIN)
        conn = self._conn if self.listening else None
        if conn is not None:
            with contextlib.suppress(Exception):
                poll.register(conn.fileno(), select.POLLIN)
        if conn is not None and self._notified(conn):  # NOTIFYs that came in with a poll's reply
            pause = 0
        if pause > 0:
            with contextlib.suppress(InterruptedError):
                poll.poll(pause * 1000)
        with self._lock:
            if self._woken:  # (nothing was written to the pipe otherwise)
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._rfd, 4096):
                        pass
                self._woken = False
        if conn is not None:
            self._notified(conn)

    def _notified(self, conn: Any) -> bool:
        """Mark the streams named by NOTIFYs received on `conn`; False when none had come."""
        try:
            payloads = _take_notifies(conn)
        except Exception:  # a dead connection: the next poll finds out and reconnects
            self.listening = False
            return False
        if not payloads:
            return False
        runs = set(filter(None, payloads))
        everything = len(runs) < len(payloads)  # an empty payload: a run id too long to send
        with self._lock:
            self._dirty.update(self._watches if everything else runs & self._watches.keys())
        return True

    def _connect(self) -> Any:
        """The poller's connection, set up (LISTEN, PREPARE) whenever it is a new one."""
        conn = self._storage.connection()
        if conn is not self._conn:
            if self._conn is not None:  # reconnected: what happened meanwhile sent no NOTIFY here
                self.poke_all()
            self._conn = conn
            self._data_version = None
            self._prepared = {}
            self.listening = False
            if self._dialect.notifies_appends:
                self._setup_postgres(conn)
        return conn

    def _setup_postgres(self, conn: Any) -> None:
        if hasattr(conn, "notifies"):  # psycopg2 and psycopg 3 (other drivers: polling only)
            try:
                self._storage.execute(f"LISTEN {CHANNEL}")
                self.listening = True
            except peewee.DatabaseError as exc:
                logger.info("stream poller: LISTEN failed, following by polling only: %s", exc)
        if self._prepare and type(conn).__module__.split(".")[0] == "psycopg":
            # psycopg 3 binds parameters on the server, and EXECUTE (a utility statement) takes none:
            # it prepares statements itself (prepare_threshold) instead.
            self._prepare = False
        if self._prepare:
            try:
                self._storage.execute(f"PREPARE {_PREPARED}(text[], bigint[], bigint[]) AS {self._sql}")
            except peewee.DatabaseError as exc:
                if _pg_code(exc) != "42P05":  # 42P05: prepared by an earlier poller on this pooled connection
                    logger.info("stream poller: PREPARE failed, polling with plain statements: %s", exc)
                    self._prepare = False

    def _release(self) -> None:
        """Give the connection back (a pooled one clean: no LISTEN, no prepared statement)."""
        db, conn = self._db, self._conn
        self._conn = None
        self.listening = False
        if db.is_closed() or os.getpid() != self._pid or self.inline:
            return
        prepared, self._prepared = self._prepared, {}
        with self._statements():
            self._clean_up(db, conn, prepared)

    def _statements(self) -> contextlib.AbstractContextManager[Any]:
        """Around the poller's SQL: holds `_busy`, which a fork waits for (`_before_fork`), where
        the dialect says a fork must wait (SQLite). Not on a network server, where a poller may
        wait out a reconnect window in there: a fork would wait with it."""
        return self._busy if self._dialect.fork_waits_for_statements else contextlib.nullcontext()

    def _clean_up(self, db: peewee.Database, conn: Any, prepared: Dict[int, Tuple[Any, int, Dict[str, int]]]
                  ) -> None:
        try:
            if conn is not None and isinstance(db, PooledDatabase) and self._dialect.notifies_appends and \
                    not db.in_transaction():
                self._storage.execute(f"UNLISTEN {CHANNEL}")
                if self._prepare:
                    self._storage.execute(f"DEALLOCATE {_PREPARED}")
            if isinstance(db, PooledDatabase) and not db.in_transaction():
                for index, (on, _, _) in prepared.items():
                    if on is conn:
                        self._storage.execute(self._dialect.check_statements(f"{_CHECK_STATEMENT}{index}")[2])
        except Exception:
            logger.debug("stream poller: cleaning up the connection failed", exc_info=True)
        with contextlib.suppress(Exception):
            db.close()

    def _failed(self, targets: Set[str], exc: Exception) -> None:
        """A poll failed: followers not yet started get the error; the others just wait longer,
        unless it is not a lost connection (then they get it too: retrying would not help)."""
        lost = isinstance(exc, (ConnectionLostError, PoolExhaustedError)) or (
            isinstance(exc, (peewee.OperationalError, peewee.InterfaceError))
            and self._dialect.is_connection_lost(exc))
        if lost:
            # (The executor has dropped a dead connection already: the next round connects anew,
            # and LISTENs and PREPAREs again.)
            logger.warning("stream poller: %s; retrying",
                           str(exc).strip().splitlines()[0] if str(exc) else exc)
            self._conn = None
            self.listening = False
        else:
            logger.error("stream poller: polling failed: %s", exc)
        with self._lock:
            for run_id in targets:
                for w in self._watches.get(run_id, ()):
                    if not lost or not w.checked:
                        w.error = exc
                        w.event.set()
            self._dirty.update(targets)  # try those again

    def _poll(self, targets: Set[str], full: bool = False) -> None:
        """One round: read the `targets` streams, or (`full`) every followed stream, in chunks of
        STREAMS_PER_POLL, and feed their watches."""
        with self._statements():
            self._poll_round(targets, full)

    def _poll_round(self, targets: Set[str], full: bool) -> None:
        self._connect()
        if full or self.inline:
            now = time.monotonic()
            if now >= self._alive_at:  # before the data_version shortcut: a dead worker writes nothing
                self._alive_at = now + LIVENESS_PAUSE
                targets = targets | self._check_alive()
        if full and self._dialect.has_data_version and not self._unchecked:
            # Nothing committed by any connection since the last timed poll: nothing to read.
            version = self._storage.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                full = False
            self._data_version = version
        if full and self._dialect.polls_by_checks:
            now = time.monotonic()
            self._with_status = bool(self._unchecked) or now - self._status_at >= STATUS_PAUSE
            if self._with_status:
                self._status_at = now
        with self._lock:
            if full and self._plan is not None and self._plan[0] == self._version:
                plan = self._plan[1]  # an idle round: the same statement parameters as the last one
            else:
                run_ids = self._watches.keys() if full else targets
                wanted: List[Tuple[str, int, List[_Watch]]] = []
                for run_id in run_ids:
                    hungry = [w for w in self._watches.get(run_id, ()) if not w.full and w.end is None]
                    if hungry:
                        wanted.append((run_id, min(w.cursor for w in hungry), hungry))
                plan = []
                # (MariaDB's check returns run ids only, and reads each stream with news alone.)
                per = CHECKS_PER_POLL if self._dialect.polls_by_checks else STREAMS_PER_POLL
                for start in range(0, len(wanted), per):
                    chunk = wanted[start:start + per]
                    window = POLL_BATCH if per == CHECKS_PER_POLL else \
                        max(16, min(POLL_BATCH, ROWS_PER_POLL // len(chunk)))
                    plan.append((chunk, window,
                                 self._params([(r, a, a + window) for r, a, _ in chunk], full, len(plan))))
                if full:
                    self._plan = (self._version, plan)
        for chunk, window, params in plan:
            rows = self._read(params)
            if rows or self._unchecked or self._stale_runs:
                self._deliver(chunk, window, rows)

    def _check_alive(self) -> Set[str]:
        """The liveness check: mark the watches of followed runs whose worker is presumed dead
        (still running, no heartbeat for their `stale_after`); the run ids marked, to be polled
        now (their followers end "stale" once they have every event stored).

        One plain statement per STREAMS_PER_POLL runs, on the same columns everywhere
        (``status``, ``updatedAt`` > ``startedAt``: runs whose writer heartbeats).
        """
        with self._lock:
            limits = {run_id: min(w.stale_after for w in ws if w.stale_after is not None)
                      for run_id, ws in self._watches.items()
                      if any(w.stale_after is not None and not w.stale for w in ws)}
        if not limits or not self._liveness:
            return set()
        now = now_ms()
        self._alive_last = time.monotonic()
        shortest = min(limits.values())
        # A short stale_after (tests, impatient apps) is checked more often than LIVENESS_PAUSE.
        self._alive_at = time.monotonic() + min(LIVENESS_PAUSE, shortest / 4)
        cutoff = now - int(shortest * 1000)
        Run = self._models.run
        ids = sorted(limits)
        found: Dict[str, int] = {}
        try:
            for start in range(0, len(ids), STREAMS_PER_POLL):
                query = Run.select(Run.run_id, Run.updated_at).where(
                    Run.run_id.in_(ids[start:start + STREAMS_PER_POLL]), Run.status == "running",
                    Run.updated_at < cutoff, Run.updated_at > Run.started_at)
                self.liveness_checks += 1
                for run_id, updated in self._storage.rows(query):
                    found[run_id] = updated if isinstance(updated, int) else self._dialect.decode_ts(updated)
        except peewee.DatabaseError as exc:
            if isinstance(exc, ConnectionLostError) or self._dialect.is_connection_lost(exc):
                raise  # (the round fails and is tried again, as a poll's would)
            # No agent_runs here (a storage of the streams domain only, its runs kept elsewhere):
            # followers end only when their streams do, as before.
            logger.warning("stream poller: cannot read agent_runs (%s); followers here will not end "
                           "\"stale\"", str(exc).strip().splitlines()[0] if str(exc) else exc)
            self._liveness = False
            return set()
        marked: Set[str] = set()
        with self._lock:
            for run_id, updated in found.items():
                for w in self._watches.get(run_id, ()):
                    if w.stale_after is not None and not w.stale and now - updated > w.stale_after * 1000:
                        w.stale = True
                        marked.add(run_id)
            self._stale_runs |= marked
        if marked:
            logger.info("stream poller: %d followed run(s) sent no heartbeat for their stale_after; "
                        "their followers end \"stale\": %s", len(marked), sorted(marked)[:10])
        return marked

    def _params(self, entries: List[Tuple[str, int, int]], full: bool, index: int) -> Any:
        """The poll statement's parameters for (run id, after, upto) entries (chunk `index` of a round)."""
        if self._dialect.polls_with_arrays:
            return ([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])
        if self._dialect.polls_by_checks:
            check = json.dumps([e[:2] for e in entries], ensure_ascii=False, separators=(",", ":")) \
                if full else None
            return (check, entries, index)
        return (json.dumps(entries, ensure_ascii=False, separators=(",", ":")),)

    def _read_by_checks(self, params: Any) -> List[Row]:
        """MariaDB/MySQL: (for a timed poll) which streams have news, then each of those read alone."""
        check, entries, index = params
        if check is not None:
            # Most timed checks only look for new events (an index point lookup per stream); one
            # every STATUS_PAUSE also reads each stream's row, for closes and deletes that came
            # without an event (this process's own closes poke the poller at once anyway).
            if self._with_status:
                news = list(self._storage.execute(self._check_sqls[True], (check,)).fetchall())
            else:
                news = self._check(check, entries, index)
            changed = {row[0] for row in news}
            entries = [e for e in entries if e[0] in changed] if changed else []
        rows: List[Row] = []
        for run_id, since, upto in entries:
            got = self._storage.execute(self._one_sql, (run_id, since, upto, run_id)).fetchall()
            rows.extend(got if got else [(run_id, None, 0, None, None)])  # no row: the stream is gone
        return rows

    def _check(self, check: str, entries: List[Tuple[str, int, int]], index: int) -> List[Row]:
        """The rows of the timed check (new events only) of chunk `index`: `entries`, whose pairs
        the JSON array `check` holds.

        Sending the array costs the client tens of kilobytes to escape and send, and the server
        parsing them, every round, for streams that are mostly idle. So the pairs are written into
        a statement PREPAREd on the poller's connection (at most every PREPARE_PAUSE), which each
        round EXECUTEs; only the streams whose seq moved since ("hot") go as an array beside it
        (written in at the next PREPARE: when they stay put for a round, or most have moved).
        When the statement is gone (a new session: a reconnect anywhere on
        the way) or is not ours (another poller's on a pooled connection; told by its token), the
        whole array is sent as before.
        """
        conn = self._storage.connection()
        prepared = self._prepared.get(index)
        hot: List[Tuple[str, int, int]] = []
        now = time.monotonic()
        if prepared is not None and prepared[0] is conn:
            last = self._hot.get(index)
            if last is not None and last[0] is entries:
                hot = last[1]  # the plan of the last round (an idle round)
                if hot and now - self._prepared_at >= PREPARE_PAUSE:
                    prepared = None  # the moved streams stay where they are: write them in
            else:
                written = prepared[2]
                hot = [e for e in entries if written.get(e[0]) != e[1]]
                self._hot[index] = (entries, hot)
                if len(hot) * 4 > len(entries) + 64:
                    prepared = None  # most of it has moved: write the statement anew
        if prepared is None or prepared[0] is not conn:
            if now - self._prepared_at < PREPARE_PAUSE or not self._prepare_checks or \
                    not self._dialect.prepares_checks:
                return list(self._storage.execute(self._check_sqls[False], (check,)).fetchall())
            self._prepared_at = now
            prepared = self._prepare_check(entries, index)
            if prepared is None:
                return list(self._storage.execute(self._check_sqls[False], (check,)).fetchall())
            hot = []
        rows: List[Row]
        try:
            rows = list(self._storage.execute(self._dialect.check_statements(f"{_CHECK_STATEMENT}{index}")[1],
                                              (prepared[1],)).fetchall())
        except peewee.DatabaseError as exc:  # (gone with a new session: PREPARE again)
            logger.debug("stream poller: EXECUTE of the prepared check failed: %s", exc)
            rows = [(None, None)]
        if any(row[0] is None for row in rows):  # not there, or not ours
            self._prepared.pop(index, None)
            return list(self._storage.execute(self._check_sqls[False], (check,)).fetchall())
        if hot:
            moved = {e[0] for e in hot}
            rows = [row for row in rows if row[0] not in moved]
            array = json.dumps([e[:2] for e in hot], ensure_ascii=False, separators=(",", ":"))
            rows.extend(self._storage.execute(self._check_sqls[False], (array,)).fetchall())
        return rows

    def _prepare_check(self, entries: List[Tuple[str, int, int]], index: int
                       ) -> Optional[Tuple[Any, int, Dict[str, int]]]:
        """PREPARE chunk `index`'s timed check with `entries` written in; None if refused."""
        token = random.getrandbits(62)
        pairs = [(e[0], e[1]) for e in entries]
        sql = self._dialect.build_check_sql(self._models, False, pairs, token)
        try:
            self._storage.execute(self._dialect.check_statements(f"{_CHECK_STATEMENT}{index}")[0], (sql,))
        except peewee.DatabaseError as exc:
            if isinstance(exc, ConnectionLostError) or self._dialect.is_connection_lost(exc):
                raise  # (the round fails, and the next one reconnects)
            logger.info("stream poller: PREPARE refused, sending the whole check each time: %s", exc)
            self._prepared.pop(index, None)
            self._prepare_checks = False
            return None
        prepared = self._prepared[index] = (self._storage.connection(), token, dict(pairs))
        self._hot[index] = (entries, [])
        return prepared

    def _read(self, params: Any) -> List[Row]:
        self.polls += 1
        if self._dialect.polls_by_checks:
            return self._read_by_checks(params)
        if not self._dialect.polls_with_arrays:
            return list(self._storage.execute(self._sql, params).fetchall())
        arrays = params
        if not self._prepare:
            return list(self._storage.execute(self._plain_sql, arrays).fetchall())
        try:
            return list(self._storage.execute(f"EXECUTE {_PREPARED}(%s, %s, %s)", arrays).fetchall())
        except peewee.DatabaseError as exc:
            if _pg_code(exc) != "26000":  # 26000: no such prepared statement
                raise
        if self._db.connection() is self._conn:
            # Same connection, yet the statement is gone: a pooler (pgbouncer) hands our statements
            # to other server sessions. Plain statements from now on.
            logger.info("stream poller: prepared statements do not stick to this connection; not preparing")
            self._prepare = False
        else:
            self._connect()  # a reconnect inside execute: prepare (and LISTEN) on the new connection
        return self._read(params)

    def _deliver(self, chunk: List[Tuple[str, int, List[_Watch]]], window: int, rows: List[Row]) -> None:
        found: Dict[str, Tuple[Any, int, List[Tuple[int, Any]]]] = {}
        for run_id, status, last, seq, raw in rows:
            got = found.get(run_id)
            if got is None:
                got = found[run_id] = (status, int(last or 0), [])
            if seq is not None:
                got[2].append((seq, raw))
        again = []
        checked = 0
        for run_id, after, watches in chunk:
            got = found.get(run_id)
            if got is None:  # open, nothing after `after`: only new followers need to hear that
                for w in watches:
                    if w.stale and w.end is None:
                        w.end = "stale"  # (a dead run's follower that has everything)
                        w.event.set()
                    if not w.checked:
                        w.checked = True
                        checked += 1
                        w.event.set()
                continue
            status, last, events = got
            events.sort(key=_first)  # (no ORDER BY: it costs MariaDB a temporary table per poll)
            reach = min(last, after + window)  # every event up to here has been read
            for w in watches:
                if status is None:
                    w.end = "deleted"  # (events left without their stream are not delivered)
                else:
                    w.last = last
                    if events and events[-1][0] > w.cursor:
                        w.queue.extend(e for e in events if e[0] > w.cursor)
                    if reach > w.cursor:
                        w.cursor = reach
                    if status != "open" and w.cursor >= last:
                        w.end = "closed"
                    elif w.stale and w.cursor >= last:
                        w.end = "stale"
                    elif len(w.queue) >= POLL_BATCH:
                        w.full = True
                    elif w.cursor < last:
                        again.append(run_id)  # more to read: next round, without waiting
                if not w.checked:
                    w.checked = True
                    checked += 1
                w.event.set()
        with self._lock:
            self._unchecked -= checked
            if self._stale_runs:
                self._stale_runs -= {run_id for run_id, _, watches in chunk
                                     if all(w.end is not None for w in watches)}
            if found:
                self._version += 1  # cursors moved: the next timed poll asks anew
            if again:
                self._dirty.update(again)
                self._wake()

    # -- fork ----------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's thread and make its connection inert."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _INHERITED.append(conn)  # never closed here: closing would tell the server to end it
            with contextlib.suppress(Exception):
                fd = _fileno(conn)
                if fd is not None:
                    null = os.open(os.devnull, os.O_RDWR)
                    os.dup2(null, fd)  # whatever the child's copy might send goes nowhere
                    os.close(null)
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._thread = None
        self._watches = {}
        self._dirty = set()
        self._stoppable = 0
        self._interval = LINGER
        self._unchecked = 0
        self._stale_runs = set()
        self._plan = None
        self._data_version = None
        self._prepared = {}
        self.listening = False
        self._pid = os.getpid()
        self._fds()  # the pipe is shared with the parent: a new one
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._fds = weakref.finalize(self, _close_fds, self._rfd, self._wfd)
        self._fds.atexit = False
        self._woken = False
        # peewee's per-thread state of the poller thread may hold the same connection: a new
        # poller thread in the child gets a fresh state, and this one is never used again.


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fileno(conn: Any) -> Optional[int]:
    if hasattr(conn, "fileno"):  # psycopg2
        return int(conn.fileno())
    sock = getattr(conn, "_sock", None)  # PyMySQL
    return None if sock is None else int(sock.fileno())


_POLLERS: weakref.WeakSet[Poller] = weakref.WeakSet()
_INHERITED: List[Any] = []


#: Longest a fork waits for a poller to leave its statement (a poll stuck on a dead network).
FORK_WAIT = 10.0
_HELD: List[threading.Lock] = []


def _before_fork() -> None:
    """Before `fork()`: wait until no SQLite poller is inside a statement, and keep them out until
    the fork is done. A fork copies only the forking thread; a lock a poller thread held inside
    the database library (SQLite's mutexes, its VFS's lock) would stay locked in the child for
    ever, and the child would hang at its first statement. (Pollers of network servers never
    hold `_busy`: see `Poller._statements`.)"""
    for poller in list(_POLLERS):
        busy = poller._busy
        if busy.acquire(timeout=FORK_WAIT):
            _HELD.append(busy)
        else:
            logger.warning("fork: a stream poller stayed inside a statement for %g s; forking anyway",
                           FORK_WAIT)


def _after_fork_in_parent() -> None:
    while _HELD:
        _HELD.pop().release()


def _reinit_after_fork() -> None:
    _HELD.clear()  # (the child's pollers get new locks)
    for poller in list(_POLLERS):
        poller._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_reinit_after_fork)


def _take_notifies(conn: Any) -> List[str]:
    """The payloads of the NOTIFYs the PostgreSQL driver connection `conn` has received, without
    waiting: psycopg2 keeps them in a list that `poll()` fills from the socket; psycopg 3 hands them
    out through `notifies(timeout=0)`, including those that came in with a statement's reply."""
    notifies = conn.notifies
    if callable(notifies):  # psycopg 3
        return [n.payload for n in notifies(timeout=0)]
    conn.poll()
    payloads = [n.payload for n in notifies]
    del notifies[:len(payloads)]
    return payloads


def _first(item: Tuple[int, Any]) -> int:
    return item[0]


def _pg_code(exc: BaseException) -> Optional[str]:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def notify_sql(dialect: Dialect, returning_sql: str) -> str:
    """`returning_sql` (an INSERT/UPDATE ... RETURNING the run id) made to NOTIFY the pollers of
    every process for each row it writes, in the same statement (``RETURNING pg_notify(...)``);
    its row count stays the rows written. Elsewhere (`Dialect.notifies_appends` false): unchanged."""
    if not dialect.notifies_appends:
        return returning_sql
    head, column = returning_sql.rsplit(" RETURNING ", 1)
    return (f"{head} RETURNING pg_notify('{CHANNEL}', "
            f"CASE WHEN octet_length({column}) <= {_PAYLOAD_BYTES} THEN {column} ELSE '' END)")


def _one_sql(models: Models) -> str:
    """MariaDB: one stream's status, last seq and events in (since, upto], bounds as constants."""
    streams = models.stream._meta.table_name
    events = models.stream_event._meta.table_name
    return (f"SELECT s.id, s.status, (SELECT MAX(x.seq) FROM {events} x WHERE x.run_id = %s), e.seq, e.event "
            f"FROM {streams} s LEFT JOIN {events} e ON e.run_id = s.id AND e.seq > %s AND e.seq <= %s "
            f"WHERE s.id = %s")


def in_memory_sqlite(database: peewee.Database) -> bool:
    """True for an in-memory SQLite database: another thread's connection would see another database."""
    if not isinstance(database, peewee.SqliteDatabase):
        return False
    name = str(database.database or "")
    return name in ("", ":memory:") or "mode=memory" in name

