"""The followed streams of one poller: each follower's `Watch`, and `Watches`, the registry.

The followers' threads register and drop watches and poke streams; the poller thread takes
from it what to read each round and feeds the watches (delivery.py). Everything shared is
guarded by `Watches.lock`; the poller sleeps on the `Doorbell`, which a poke rings.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, List, Optional, Set, Tuple

if TYPE_CHECKING:
    from .dialects.polling import PollReader

#: (run id, the seq after which its hungriest watch wants events, those watches), per stream.
Chunk = List[Tuple[str, int, List["Watch"]]]

__all__ = ["Watch", "Watches", "Doorbell", "Chunk", "LINGER"]

#: Seconds the poller stays after its last follower left (a quick next `resume` reuses it); also
#: the longest it sleeps without followers.
LINGER = 1.0


class Watch:
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


class Doorbell:
    """A non-blocking pipe the poller sleeps on; `ring` wakes it (at most one byte in flight)."""

    def __init__(self) -> None:
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._rung = False
        self._close = weakref.finalize(self, _close_fds, self._rfd, self._wfd)
        self._close.atexit = False  # daemon poller threads may still be lingering at exit

    def fileno(self) -> int:
        """The end to wait on."""
        return self._rfd

    def ring(self) -> None:
        """Wake the poller (call with `Watches.lock` held)."""
        if not self._rung:
            self._rung = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wfd, b"\0")

    def answer(self) -> None:
        """Empty the pipe after waking (call with `Watches.lock` held)."""
        if self._rung:  # (nothing was written otherwise)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._rfd, 4096):
                    pass
            self._rung = False

    def close(self) -> None:
        """Close both ends (a forked child's copy of its parent's pipe)."""
        self._close()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Watches:
    """Run id -> the watches of its followers, and what the poller reads next: the streams poked
    (`dirty`), and the timed round's plan, kept while nothing changes (`version`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_run: Dict[str, List[Watch]] = {}
        self.dirty: Set[str] = set()
        self.stoppable = 0  # watches with a stop event: the poller checks those every tick
        self.interval = LINGER  # the shortest poll_interval of the followers
        self.unchecked = 0  # followers waiting for their first answer
        self.version = 0
        self.plan: Optional[Tuple[int, List[Any]]] = None  # (version, the timed round's chunks)
        self.stale_runs: Set[str] = set()  # runs found dead whose followers have not ended yet
        self.bell = Doorbell()

    def add(self, watch: Watch) -> None:
        """Register `watch` (with the lock held)."""
        watches = self.by_run.setdefault(watch.run_id, [])
        watches.append(watch)
        if watch.stop is not None:
            self.stoppable += 1
        self.interval = min(self.interval, watch.interval) if len(self.by_run) > 1 or len(watches) > 1 \
            else watch.interval
        self.unchecked += 1
        self.version += 1

    def remove(self, watch: Watch) -> None:
        """Forget `watch`, if registered; the poller starts lingering once none is left."""
        with self.lock:
            watches = self.by_run.get(watch.run_id)
            if watches is None or watch not in watches:
                return
            watches.remove(watch)
            if not watches:
                del self.by_run[watch.run_id]
                self.stale_runs.discard(watch.run_id)
            if watch.stop is not None:
                self.stoppable -= 1
            if not watch.checked:
                self.unchecked -= 1
            self.version += 1
            if watch.interval <= self.interval:
                self.interval = min((w.interval for ws in self.by_run.values() for w in ws), default=LINGER)
            if not self.by_run:
                self.bell.ring()  # so it starts lingering now

    def poke(self, run_id: str) -> None:
        """Stream `run_id` changed: read it now, if followed."""
        if run_id in self.by_run:
            with self.lock:
                self.dirty.add(run_id)
                self.version += 1
                self.bell.ring()

    def poke_all(self) -> None:
        """Any followed stream may have changed: read them all now."""
        with self.lock:
            self.dirty.update(self.by_run)
            self.bell.ring()

    def mark(self, run_ids: Iterable[str]) -> None:
        """Read these followed streams in the next round (the poller's own thread: no ring)."""
        with self.lock:
            self.dirty.update(run_ids)

    def wake_stopped(self) -> None:
        """Wake the followers whose stop event is set (with the lock held)."""
        if self.stoppable:
            for ws in self.by_run.values():
                for w in ws:
                    if w.stop is not None and w.stop.is_set():
                        w.event.set()

    def fail(self, run_ids: Set[str], exc: BaseException, lost: bool) -> None:
        """A round reading `run_ids` failed with `exc`: followers not yet started get the error, the
        others too unless the connection was `lost` (then they wait for the next round)."""
        with self.lock:
            for run_id in run_ids:
                for w in self.by_run.get(run_id, ()):
                    if not lost or not w.checked:
                        w.error = exc
                        w.event.set()
            self.dirty.update(run_ids)  # try those again

    def crash(self) -> None:
        """The poller thread died of a bug: every follower gets an error instead of hanging."""
        with self.lock:
            for ws in self.by_run.values():
                for w in ws:
                    w.error = RuntimeError("the stream poller crashed; see the log")
                    w.event.set()

    def plan_round(self, reader: PollReader, targets: Set[str], full: bool) -> List[Tuple[Chunk, int, Any]]:
        """The chunks of a round reading `targets` (or, `full`, every followed stream), each with
        its seq window and `reader`'s parameters; a timed round's plan is kept while nothing
        changes (an idle round sends the same parameters)."""
        with self.lock:
            if full and self.plan is not None and self.plan[0] == self.version:
                return self.plan[1]
            wanted: Chunk = []
            for run_id in (self.by_run.keys() if full else targets):
                hungry = [w for w in self.by_run.get(run_id, ()) if not w.full and w.end is None]
                if hungry:
                    wanted.append((run_id, min(w.cursor for w in hungry), hungry))
            plan: List[Tuple[Chunk, int, Any]] = []
            per = reader.streams_per_chunk
            for start in range(0, len(wanted), per):
                chunk = wanted[start:start + per]
                window = reader.window(len(chunk))
                entries = [(r, a, a + window) for r, a, _ in chunk]
                plan.append((chunk, window, reader.params(entries, full, len(plan))))
            if full:
                self.plan = (self.version, plan)
            return plan
