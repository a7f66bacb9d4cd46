"""The fork guard: a `fork()` while stream pollers run leaves the child sound.

A fork copies only the forking thread. Before it, the guard waits until no poller that must be
waited for (SQLite: `Dialect.fork_waits_for_statements`) is inside a statement, and keeps them
out until the fork is done: a lock a poller thread held inside the database library (SQLite's
mutexes, its VFS's lock) would stay locked in the child for ever, and the child would hang at
its first statement. In the child every poller starts afresh (`Poller.after_fork`): no thread,
no watches, its own pipe; the parent's connection is made inert (`make_inert`) and kept, never
closed, so the child can never talk on it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from typing import Any, List, Optional, Protocol

logger = logging.getLogger(__name__)

__all__ = ["register", "make_inert", "FORK_WAIT"]

#: Longest a fork waits for a poller to leave its statement (a poll stuck on a dead network).
FORK_WAIT = 10.0


class _Guarded(Protocol):
    busy: threading.Lock

    def after_fork(self) -> None:
        """In the child: start afresh."""


_POLLERS: weakref.WeakSet[Any] = weakref.WeakSet()
#: The parent's connections, inherited by this child: kept (closing one would tell the server to
#: end the parent's session), never used.
_INHERITED: List[Any] = []
_HELD: List[threading.Lock] = []


def register(poller: _Guarded) -> None:
    """Guard `poller` across forks while it lives."""
    _POLLERS.add(poller)


def make_inert(conn: Any, fd: Optional[int]) -> None:
    """In a forked child: keep the parent's driver connection `conn` and point its socket `fd` at
    /dev/null, so whatever the child's copy might send goes nowhere."""
    _INHERITED.append(conn)  # never closed here: closing would tell the server to end it
    if fd is None:
        return
    with contextlib.suppress(Exception):
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)


def _before_fork() -> None:
    # (Pollers of network servers never hold `busy`: see `Poller._statements`.)
    for poller in list(_POLLERS):
        busy = poller.busy
        if busy.acquire(timeout=FORK_WAIT):
            _HELD.append(busy)
        else:
            logger.warning("fork: a stream poller stayed inside a statement for %g s; forking anyway",
                           FORK_WAIT)


def _after_fork_in_parent() -> None:
    while _HELD:
        _HELD.pop().release()


def _after_fork_in_child() -> None:
    _HELD.clear()  # (the child's pollers get new locks)
    for poller in list(_POLLERS):
        poller.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
