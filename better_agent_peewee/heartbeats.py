"""The background heartbeat of tracked runs: one thread per storage keeps their ``updatedAt`` fresh.

A run's ``updatedAt`` is how others tell a live worker from a dead one: followers end
"stale" (`followers.STALE_AFTER`) and `reap_stale` fails a run once it is older than their
limit. A worker inside one long step (a model call, a tool) emits nothing and checks
nothing for a while, so the beats cannot come from its own calls alone. While a
`storage.runs.track(...)` block runs, its run is registered here, and one thread per
storage sets ``updatedAt`` = now for every registered run that is due, in one UPDATE per
`_CHUNK` runs (``WHERE run_id IN (...) AND status = 'running'``), on its own connection.

So the beat says that the worker's process lives, not that its step makes progress: a
process that hangs keeps its run alive. A killed process stops beating at once. The first
beat comes 10 ms to 1 s after the start (`FIRST_BEAT`, `FIRST_BEAT_LATEST`), so that
``updatedAt`` passes ``startedAt`` early (followers judge only runs that have beaten at least
once: a writer that never beats, such as Better Agent's own runtime, is never called dead; a
worker killed before its first beat is left to `reap_stale`). A run beats up to half an
interval early, so that the runs of a process share their rounds: about one UPDATE per
interval per 500 runs, however their starts were spread.

The thread starts with the first registered run and ends `LINGER` seconds after the last
one left, closing its connection. An in-memory SQLite database is per connection: there
the runs beat only from their own calls. After `fork()` a child forgets the parent's runs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .driver_errors import first_line
from .timestamps import now_ms

if TYPE_CHECKING:
    from .executor import Executor
    from .models import Models

logger = logging.getLogger(__name__)

__all__ = ["Heartbeats", "FIRST_BEAT"]

#: Seconds after its start when a tracked run may beat for the first time (then every interval):
#: in a later millisecond than ``startedAt``, so that followers judge the run from then on (a
#: worker killed before its first beat is left to `reap_stale`) ...
FIRST_BEAT = 0.01
#: ... and when it must have: new runs within this second share their first UPDATE.
FIRST_BEAT_LATEST = 1.0
#: Fewest seconds between two beats of one run, whatever its interval (0 beats from every call).
MIN_PAUSE = 0.5
#: Seconds the thread stays after the last run left.
LINGER = 2.0
#: Runs per UPDATE.
_CHUNK = 500
#: Longest a fork waits for the thread to leave its statement (SQLite).
FORK_WAIT = 10.0


class Heartbeats:
    """The heartbeat thread of one storage (see the module doc)."""

    def __init__(self, executor: Executor, models: Models) -> None:
        self._executor = executor
        self._run = models.run
        # run id -> (earliest, latest) monotonic time of its next beat. The thread wakes at the
        # first `latest` and beats every run whose `earliest` has passed, in one UPDATE: a run
        # beats up to half an interval early, so the runs of a process fall into shared rounds.
        self._due: Dict[str, Tuple[float, float]] = {}
        self._every: Dict[str, float] = {}
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # held inside a statement on SQLite: a fork waits for it
        self._thread: Optional[threading.Thread] = None
        self.inline = executor.dialect.per_connection_database()
        #: UPDATE statements run (for tests and benchmarks).
        self.statements = 0
        _ALL.add(self)

    def add(self, run_id: str, interval: float) -> None:
        """Beat `run_id` at least every `interval` seconds (the first beat between FIRST_BEAT and
        FIRST_BEAT_LATEST after now) until `remove`."""
        if self.inline:
            return
        every = max(float(interval), MIN_PAUSE)
        with self._cond:
            self._every[run_id] = every
            now = time.monotonic()
            self._due[run_id] = (now + min(FIRST_BEAT, every), now + min(FIRST_BEAT_LATEST, every))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="better-agent-heartbeat", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, run_id: str) -> None:
        """Stop beating `run_id` (its block ended)."""
        with self._cond:
            self._due.pop(run_id, None)
            self._every.pop(run_id, None)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._due

    def _loop(self) -> None:
        me = threading.current_thread()
        idle_since: Optional[float] = None
        try:
            while True:
                with self._cond:
                    if self._thread is not me:
                        return
                    now = time.monotonic()
                    if not self._due:
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= LINGER:
                            self._thread = None
                            return
                        self._cond.wait(LINGER - (now - idle_since))
                        continue
                    idle_since = None
                    wake = min(latest for _, latest in self._due.values())
                    if wake > now:
                        self._cond.wait(wake - now)
                        continue
                    due = sorted(r for r, (earliest, _) in self._due.items() if earliest <= now)
                    for run_id in due:
                        every = self._every[run_id]
                        self._due[run_id] = (now + every / 2, now + every)
                self._beat(due)
        finally:
            with self._cond:
                if self._thread is me:  # (ended by an error: the next `add` starts a new thread)
                    self._thread = None
            with contextlib.suppress(Exception):
                self._executor.database.close()  # this thread's connection (back to the pool)

    def _beat(self, run_ids: List[str]) -> None:
        """One UPDATE per chunk: ``updatedAt`` = now where still running. A failure is logged and
        the next round tries again (a lost connection reconnects)."""
        Run = self._run
        try:
            for start in range(0, len(run_ids), _CHUNK):
                query = Run.update(updated_at=now_ms()).where(Run.run_id.in_(run_ids[start:start + _CHUNK]),
                                                               Run.status == "running")
                with self._statements():
                    self._executor.execute_query(query, idempotent=True)
                self.statements += 1
        except Exception as exc:
            logger.warning("heartbeat of %d tracked run(s) failed (next try in their interval): %s",
                           len(run_ids), first_line(exc))

    def _statements(self) -> contextlib.AbstractContextManager[object]:
        if self._executor.dialect.fork_waits_for_statements:
            return self._busy
        return contextlib.nullcontext()

    def _after_fork(self) -> None:
        self._cond = threading.Condition()
        self._busy = threading.Lock()
        self._thread = None
        self._due = {}
        self._every = {}


_ALL: weakref.WeakSet[Heartbeats] = weakref.WeakSet()
_HELD: List[threading.Lock] = []


def _before_fork() -> None:
    for beats in list(_ALL):
        if beats._busy.acquire(timeout=FORK_WAIT):
            _HELD.append(beats._busy)


def _after_fork_in_parent() -> None:
    while _HELD:
        _HELD.pop().release()


def _after_fork_in_child() -> None:
    _HELD.clear()
    for beats in list(_ALL):
        beats._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
