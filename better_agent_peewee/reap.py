"""Reaping: runs a dead worker left ``running`` become ``failed``, and their streams end.

The operational job a frequent cron line runs (``better-agent-peewee prune --reap-stale``),
written as a plain function over a storage object: `reap_stale(storage, stale_after)`, or
`storage.runs.reap_stale(stale_after)`. The RUN_ERROR it writes is appended through the
storage's own `Streams`, so its appends take turns with the process's others.
"""
from __future__ import annotations

import datetime as _dt
import logging
from typing import Any, Dict, List, Optional, Sequence

import peewee

from .batches import COUNT, chunks, cutoff, exists, page
from .domains import ALL_DOMAINS
from .errors import ConflictError
from .streams import Streams
from .tables import StorageParts
from .timestamps import ms_to_iso
from .timestamps import now_ms as clock_ms

logger = logging.getLogger(__name__)

__all__ = ["reap_stale", "STALE_RUN_CODE"]

#: The `code` of the RUN_ERROR final event `reap_stale` writes.
STALE_RUN_CODE = "STALE_RUN"


def reap_stale(storage: StorageParts, stale_after: _dt.timedelta, now_ms: Optional[int] = None,
               *, batch_size: int = 1000, streams: Optional[Streams] = None, dry_run: bool = False) -> int:
    """Mark runs still ``running`` but silent for longer than `stale_after` as failed.

    The trace a crashed worker leaves is a run that says running forever. Each such run
    (``updatedAt`` before now - `stale_after`) becomes ``failed`` with ``finishedAt`` and
    ``updatedAt`` = now and a final event ``{"type": "RUN_ERROR", "code": "STALE_RUN",
    "message": ..., "timestamp": now}``; the same event is appended to its open stream, which
    is then closed, so followers read why the run ended and stop waiting. The UPDATEs are
    conditional (still running, still stale), so a run that finishes meanwhile is kept; a
    stream closed by someone else meanwhile stays closed, without the event. Without the
    streams domain (`peewee_storage(db, domains=...)`) only the runs are marked.

    :param storage: the storage object (`peewee_storage`).
    :param stale_after: how long a running run may go without an update, a `timedelta`. A
        tracked run (`runs.track`) updates itself every ``heartbeat_interval`` seconds (10 by
        default) while its block runs: keep `stale_after` well above that.
    :param now_ms: "now" in epoch ms (default: the clock).
    :param batch_size: runs per transaction.
    :param streams: the `Streams` that appends the event (default: the storage's, ``storage.streams``).
    :param dry_run: count the runs it would mark failed, write nothing.
    :returns: how many runs were marked failed (with `dry_run`: would be).
    :raises TypeError: `storage` has no ``streams`` and none was passed.
    """
    if now_ms is None:
        now_ms = clock_ms()
    before = cutoff(stale_after, now_ms, "stale_after")
    executor, Run = storage.executor, storage.models.run
    stale = [Run.status == "running", Run.updated_at < before]
    if dry_run:
        (count,), = executor.rows(Run.select(COUNT).where(*stale))
        return int(count)
    final_event = {
        "type": "RUN_ERROR",
        "message": (f"run marked failed by reap_stale: still running but not updated for more than "
                    f"{_describe(stale_after)} (since {ms_to_iso(before)}); its worker is presumed dead"),
        "code": STALE_RUN_CODE,
        "timestamp": now_ms,
    }
    reaper = _Reaper(storage, _streams_of(storage, streams), stale, final_event)
    reaped = 0
    while True:
        with executor.transaction():
            # Unordered: every run of a page stops matching (failed now, or changed meanwhile), and
            # ORDER BY run_id would lead SQLite to read the run_id index instead of the status one.
            ids = [r for (r,) in executor.rows(page(Run.select(Run.run_id).where(*stale), Run.run_id, None,
                                                    batch_size, ordered=False))]
            if not ids:
                break
            reaped += sum(reaper.reap(chunk) for chunk in chunks(ids))
        if len(ids) < batch_size:
            break
    if reaped:
        logger.warning("reaped %d stale runs (running, no update since %s)", reaped, ms_to_iso(before))
    return reaped


class _Reaper:
    """The statements of one `reap_stale` call: fail a chunk of stale runs, end their streams."""

    def __init__(self, storage: StorageParts, streams: Optional[Streams], stale: List[Any],
                 final_event: Dict[str, Any]) -> None:
        self._executor, self._streams = storage.executor, streams
        self._run, self._stream = storage.models.run, storage.models.stream
        self._stale = stale
        self._final = final_event
        self._now: int = final_event["timestamp"]

    def reap(self, chunk: Sequence[Any]) -> int:
        """Fail the runs of `chunk` that are still stale; how many. Their open streams get the
        RUN_ERROR as their last event, then are closed."""
        Run, Stream, now = self._run, self._stream, self._now
        reaped = int(self._executor.execute_query(
            Run.update(status="failed", final_event=self._final, finished_at=now, updated_at=now)
            .where(Run.run_id.in_(chunk), *self._stale), idempotent=True).rowcount)
        if self._streams is None:  # no streams domain: no stream to end
            return reaped
        # Only the streams of runs this call just failed (a finished run closes its own).
        ours = (Run.select(peewee.SQL("1"))
                .where(Run.run_id == Stream.run_id, Run.status == "failed", Run.finished_at == now))
        open_streams = [r for (r,) in self._executor.rows(Stream.select(Stream.run_id).where(
            Stream.run_id.in_(chunk), Stream.status == "open", exists(ours)))]
        for run_id in open_streams:
            self._append(run_id)
        if open_streams:
            self._executor.execute_query(Stream.update(status="closed", closed_at=now, updated_at=now)
                                         .where(Stream.run_id.in_(open_streams), Stream.status == "open"),
                                         idempotent=True)
        return reaped

    def _append(self, run_id: str) -> None:
        streams = self._streams
        assert streams is not None  # (reap returns before the streams without them)
        try:
            streams.append(run_id, self._final)
        except ConflictError:
            # Closed by someone since the SELECT: it stays closed, without our event.
            if (streams.get(run_id) or {}).get("status") == "open":
                raise
            logger.info("reap_stale: stream %r was closed meanwhile; its run is failed all the "
                        "same, its stream left as it was closed", run_id)


def _streams_of(storage: StorageParts, streams: Optional[Streams]) -> Optional[Streams]:
    """The `Streams` to append with: `streams`, else the storage's own (one per storage: its
    appenders take turns on its locks and share what it remembers of each stream); None
    without the streams domain."""
    if streams is not None:
        return streams
    if "streams" not in getattr(storage, "domains", ALL_DOMAINS):
        return None
    found = getattr(storage, "streams", None)
    if not isinstance(found, Streams):
        raise TypeError(f"reap_stale needs the storage object (peewee_storage), or streams=: "
                        f"{type(storage).__name__} has no .streams")
    return found


def _describe(delta: _dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{delta.total_seconds():g}s"
