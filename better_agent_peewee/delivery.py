"""Delivery: the rows of one poll statement handed to the watches of the streams it read.

A poll returns rows only for streams where something happened (see poller.py): events after
the seq asked for, a status other than open, or no stream any more. Each watch gets the events
past its cursor, in seq order, and ends "closed" once it has every event stored before the
close, "deleted", or "stale" (liveness.py) once it has every event stored; a stream with more
to read than the window is read again next round.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .dialects.polling import POLL_BATCH, Row
from .watches import Chunk, Watch, Watches

__all__ = ["deliver"]
#: run id -> (status, last seq, [(seq, raw event)]): what one poll found.
Found = Dict[str, Tuple[Any, int, List[Tuple[int, Any]]]]


def deliver(watches: Watches, chunk: Chunk, window: int, rows: List[Row]) -> None:
    """Feed the watches of `chunk` (read with a seq `window`) from the poll's `rows`."""
    found = _found(rows)
    again: List[str] = []
    checked = 0
    for run_id, after, streams in chunk:
        got = found.get(run_id)
        if got is None:  # open, nothing after `after`: only new followers need to hear that
            for w in streams:
                if w.stale and w.end is None:
                    w.end = "stale"  # (a dead run's follower that has everything)
                    w.event.set()
                if not w.checked:
                    w.checked = True
                    checked += 1
                    w.event.set()
            continue
        if _feed(streams, after, window, got):
            again.append(run_id)  # more to read: next round, without waiting
        for w in streams:
            if not w.checked:
                w.checked = True
                checked += 1
            w.event.set()
    with watches.lock:
        watches.unchecked -= checked
        if watches.stale_runs:
            watches.stale_runs -= {run_id for run_id, _, streams in chunk
                                   if all(w.end is not None for w in streams)}
        if found:
            watches.version += 1  # cursors moved: the next timed poll asks anew
        if again:
            watches.dirty.update(again)
            watches.bell.ring()


def _found(rows: List[Row]) -> Found:
    found: Found = {}
    for run_id, status, last, seq, raw in rows:
        got = found.get(run_id)
        if got is None:
            got = found[run_id] = (status, int(last or 0), [])
        if seq is not None:
            got[2].append((seq, raw))
    return found


def _feed(streams: List[Watch], after: int, window: int, got: Tuple[Any, int, List[Tuple[int, Any]]]) -> bool:
    """Give one stream's news to its watches; True when some watch has more to read at once."""
    status, last, events = got
    events.sort(key=_first)  # (no ORDER BY: it costs MariaDB a temporary table per poll)
    reach = min(last, after + window)  # every event up to here has been read
    more = False
    for w in streams:
        if status is None:
            w.end = "deleted"  # (events left without their stream are not delivered)
            continue
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
            more = True
    return more


def _first(item: Tuple[int, Any]) -> int:
    return item[0]
