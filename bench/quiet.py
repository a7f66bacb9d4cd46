"""Timing on a shared machine: the machine-wide benchmark lock, and CPU priority.

The benchmarks that build big data sets (`bench.growth`, `bench.prune_kept`) take the lock
(``flock`` on a file every benchmark names with ``--lock``) only while they time, so that two
timed parts never overlap while builds and test suites go on, and can build at a low priority
and time at a normal one, their database server's processes included.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load1() -> float:
    """The load average over the last minute."""
    return os.getloadavg()[0]


def threads_of(pid: int) -> Iterator[int]:
    """Every thread of `pid` and of its descendants (niceness on Linux is per thread)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            yield int(tid)
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    for child in f.read().split():
                        yield from threads_of(int(child))


def renice(pids: Iterable[int], value: int) -> None:
    """Set the niceness of every thread of `pids` and of their descendants."""
    for pid in pids:
        for tid in set(threads_of(pid)):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, tid, value)


class BenchLock:
    """The machine-wide benchmark lock (``flock`` on a file), held only while timing.

    Records, for each hold, how long it waited, how long it held and the load average
    (1 minute) when it got and gave back the lock.
    """

    def __init__(self, path: Optional[str], log: Callable[[str], None] = _log) -> None:
        self.path = path
        self.log = log
        self.holds: List[Dict[str, Any]] = []

    @property
    def held_seconds(self) -> float:
        """Seconds held so far, all holds together."""
        return float(sum(hold["held_s"] for hold in self.holds))

    @contextlib.contextmanager
    def hold(self, what: str) -> Iterator[None]:
        """Hold the lock (waiting for it) for the block; no-op without a path."""
        t0 = time.perf_counter()
        f = open(self.path, "a") if self.path else None  # noqa: SIM115 (closed below)
        try:
            if f is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            t1 = time.perf_counter()
            if t1 - t0 > 1:
                self.log(f"waited {t1 - t0:.0f}s for the benchmark lock")
            before = load1()
            try:
                yield
            finally:
                self.holds.append({"what": what, "waited_s": round(t1 - t0, 2),
                                   "held_s": round(time.perf_counter() - t1, 2),
                                   "load1": [before, load1()]})
        finally:
            if f is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
