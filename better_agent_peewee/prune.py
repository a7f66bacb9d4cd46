"""Housekeeping for the runs and streams tables: prune finished runs, reap stale ones, count rows.

These are the operational jobs a cron job runs (``better-agent-peewee prune``), written as
plain functions over a storage object so Python code can call them directly::

    from datetime import timedelta
    report = prune_runs(storage, timedelta(days=7))
    log.info(report.summary())

Pruning works in batches, each batch one transaction that deletes a set of runs together
with their stream and stream events, so a process killed part-way leaves every remaining
run whole and the next run finishes the job. Memory (threads and messages) is never touched.
Batches are chosen by keyset (``run_id > last ORDER BY run_id LIMIT n``) and deleted by an
explicit id list, which keeps memory bounded and suits MySQL, which allows neither LIMIT in
an ``IN (subquery)`` nor deleting from a table the same statement selects from.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import random
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import peewee

from .checks import is_int
from .errors import ConflictError, QueryError
from .executor import Executor
from .records import FINISHED_STATUSES, RUN_STATUSES
from .streams import Streams
from .tables import StorageParts, Tables
from .timestamps import MAX_TIMESTAMP_MS, ms_to_iso
from .timestamps import now_ms as clock_ms

logger = logging.getLogger(__name__)

__all__ = ["PruneReport", "prune_runs", "reap_stale", "stats", "FINISHED_STATUSES", "STALE_RUN_CODE"]

#: The `code` of the RUN_ERROR final event `reap_stale` writes.
STALE_RUN_CODE = "STALE_RUN"

# IN lists are sent in chunks of this many parameters: SQLite builds before 3.32 allow
# only 999 parameters per statement, and very long lists plan badly everywhere.
_IN_CHUNK = 500
#: Streams (and runs' events) one prune examines for orphans, plus ten per run it prunes.
ORPHAN_SCAN = 1000


@dataclasses.dataclass
class PruneReport:
    """What `prune_runs` deleted (or, with ``dry_run``, would delete)."""

    #: Runs deleted (finished, older than the cutoff).
    runs: int = 0
    #: Streams deleted: those of the pruned runs plus orphans (whose run no longer exists).
    streams: int = 0
    #: Stream events deleted: those of the deleted streams plus orphans.
    events: int = 0
    #: True when nothing was deleted and the numbers say what would have been.
    dry_run: bool = False
    #: Transactions (batches) it took.
    batches: int = 0
    #: Wall-clock seconds.
    seconds: float = 0.0
    #: The cutoff, epoch ms: runs that finished before it were pruned.
    cutoff_ms: int = 0

    def summary(self) -> str:
        """One line for a log or a terminal, e.g. ``pruned 120 runs, 118 streams, ...``."""
        verb = "would prune" if self.dry_run else "pruned"
        return (f"{verb} {self.runs} runs, {self.streams} streams, {self.events} events "
                f"older than {ms_to_iso(self.cutoff_ms)} in {self.batches} batches "
                f"({self.seconds:.2f}s){' [dry run]' if self.dry_run else ''}")


def prune_runs(
    storage: StorageParts,
    older_than: _dt.timedelta,
    *,
    statuses: Iterable[str] = ("completed", "failed", "aborted"),
    batch_size: int = 1000,
    dry_run: bool = False,
    include_interrupted: bool = False,
    now_ms: Optional[int] = None,
    progress: Optional[Callable[[PruneReport], None]] = None,
    orphan_scan: Optional[int] = ORPHAN_SCAN,
) -> PruneReport:
    """Delete finished runs older than `older_than`, with their streams and stream events.

    A run is pruned when its status is one of `statuses` and its ``finishedAt`` is earlier
    than now - `older_than`; a run without ``finishedAt`` never is. Interrupted runs wait for
    a human to resume them, so they are kept unless `include_interrupted` is true. Orphans go
    too: streams whose run no longer exists, with all their events, and events with neither
    run nor stream, once created (stream ``createdAt``, event ``timestamp``) before the cutoff.
    Threads and messages are never touched.

    :param storage: the storage object (`peewee_storage`).
    :param older_than: how long a finished run is kept, a non-negative `timedelta`.
    :param statuses: the finished statuses to prune (``running`` is never pruned).
    :param batch_size: runs (or orphan streams) per transaction; memory use is bounded by it.
    :param dry_run: count what would be deleted, delete nothing.
    :param include_interrupted: prune interrupted runs too.
    :param now_ms: "now" in epoch ms (default: the clock), for reproducible jobs and tests.
    :param progress: called with the running totals after every batch.
    :param orphan_scan: how many streams, and how many runs' events, the orphan sweep examines
        per call, plus ten per run pruned; a window of the key order from a random place,
        so a prune costs in proportion to what it deletes, not to what the tables keep, and
        repeated prunes cover everything. A table smaller than that is swept whole every time.
        None: sweep the whole tables (reads every stream and the whole events index).
    :returns: a `PruneReport` with the counts.
    """
    chosen = _check_statuses(statuses, include_interrupted)
    if orphan_scan is not None and (not is_int(orphan_scan) or orphan_scan < 0):
        raise ValueError(f"orphan_scan must be None or a non-negative int, got {orphan_scan!r}")
    cutoff = _cutoff(older_than, now_ms, "older_than")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    started = time.monotonic()
    report = PruneReport(dry_run=dry_run, cutoff_ms=cutoff)
    executor = storage.executor
    m = storage.models
    Run, Stream, Event = m.run, m.stream, m.stream_event

    def no_run(run_id: peewee.Field) -> Any:
        return ~fn_exists(Run.select(peewee.SQL("1")).where(Run.run_id == run_id))

    def no_stream(run_id: peewee.Field) -> Any:
        return ~fn_exists(Stream.select(peewee.SQL("1")).where(Stream.run_id == run_id))

    # Each phase: a keyset-paged SELECT of ids (first column = the page key) and what to do
    # with one page. Every DELETE re-checks its condition, so a row that changed since the
    # SELECT (a run resumed, a run written for an orphan stream) is kept, and only what was
    # really deleted has its dependants deleted (on MySQL the SELECT reads a snapshot, and
    # on PostgreSQL the SELECT and the DELETE see different moments).
    finished = [Run.status.in_(chosen), Run.finished_at.is_null(False), Run.finished_at < cutoff]

    def finished_runs(status: str) -> Callable[[Optional[Tuple[Any, ...]]], peewee.Query]:
        # One status at a time, oldest first: the order of bap_agent_runs_status_finished_idx, so
        # every planner walks that index and stops after a page. Unordered (or with several
        # statuses), PostgreSQL may estimate that old finished runs are common (it multiplies the
        # selectivities of status and finishedAt) and pick a sequential scan for the LIMIT,
        # reading every kept run when the old ones are few or lie at the end of the table.
        mine = [Run.status == status, Run.finished_at.is_null(False), Run.finished_at < cutoff]

        def select(after: Optional[Tuple[Any, ...]]) -> peewee.Query:
            query: peewee.Query = Run.select(Run.run_id, Run.finished_at).where(*mine)
            if not dry_run:  # deleted rows stop matching: no keyset needed
                return query.order_by(Run.finished_at).limit(batch_size)
            if after is not None:  # keyset on (finishedAt, runId): runs can finish in the same ms
                # The stored value as the driver gave it, unconverted: rounded to our ms, a value
                # with finer digits (PostgreSQL keeps microseconds; another writer's) would
                # still be after its own bound, and the page would repeat for ever.
                run_id, at = after[0], peewee.Value(after[1], converter=False)
                query = query.where((Run.finished_at > at)
                                    | ((Run.finished_at == at) & (Run.run_id > run_id)))
            return query.order_by(Run.finished_at, Run.run_id).limit(batch_size)
        return select

    def prune_finished(rows: List[Tuple[Any, ...]]) -> None:
        ids = sorted(r for r, _ in rows)  # key order: the DELETEs then walk each index in order
        if dry_run:
            report.runs += len(ids)
            gone = ids
        else:
            report.runs += _delete(executor, Run, Run.run_id, ids, finished)
            kept = set(_select_in(executor, Run.run_id, Run.run_id, ids))
            gone = [r for r in ids if r not in kept]
        report.events += _delete_or_count(executor, Event, Event.run_id, gone, dry_run)
        report.streams += _delete_or_count(executor, Stream, Stream.run_id, gone, dry_run)

    orphan = [Stream.created_at < cutoff, no_run(Stream.run_id)]

    def orphan_streams(after: Optional[Tuple[Any, ...]]) -> peewee.Query:
        return _page(Stream.select(Stream.id, Stream.run_id).where(*orphan), Stream.id,
                     None if after is None else after[0], batch_size)

    def prune_orphan_streams(rows: List[Tuple[Any, ...]]) -> None:
        ids = [stream_id for stream_id, _ in rows]
        if dry_run:
            report.streams += len(ids)
            gone = [run_id for _, run_id in rows]
        else:
            report.streams += _delete(executor, Stream, Stream.id, ids, orphan)
            kept = set(_select_in(executor, Stream.id, Stream.id, ids))
            gone = [run_id for stream_id, run_id in rows if stream_id not in kept]
        report.events += _delete_or_count(executor, Event, Event.run_id, gone, dry_run)

    stray = [Event.timestamp < cutoff, no_run(Event.run_id), no_stream(Event.run_id)]

    def orphan_events(after: Optional[Tuple[Any, ...]]) -> peewee.Query:
        return _page(Event.select(Event.run_id).distinct().where(*stray), Event.run_id,
                     None if after is None else after[0], batch_size)

    def prune_orphan_events(rows: List[Tuple[Any, ...]]) -> None:
        report.events += _delete_or_count(executor, Event, Event.run_id, [r for (r,) in rows], dry_run, stray)

    phases: List[Tuple[str, Any, Any]] = [(f"finished runs ({status})", finished_runs(status), prune_finished)
                                          for status in chosen]
    if orphan_scan is None:
        phases += [("orphan streams", orphan_streams, prune_orphan_streams),
                   ("orphan events", orphan_events, prune_orphan_events)]
    for name, select, prune in phases:
        last: Optional[Tuple[Any, ...]] = None
        while True:
            # One transaction per page: a kill part-way loses (rolls back) at most this page,
            # never half of a run's data. On SQLite it holds the write lock from the start.
            with executor.transaction():
                rows = executor.rows(select(last))
                if not rows:
                    break
                prune(rows)
            last = rows[-1]
            report.batches += 1
            report.seconds = time.monotonic() - started
            logger.debug("prune %s: batch of %d, totals %s", name, len(rows), report)
            if progress is not None:
                progress(report)
            if len(rows) < batch_size:
                break

    if orphan_scan is not None:
        # The orphan sweeps, bounded: a window of keys (a random place in the key order, grown by
        # what this call pruned), examined page by page. The DELETEs re-check as above.
        scan = orphan_scan + 10 * report.runs
        def orphan_streams_in(keys: Sequence[Any]) -> List[Tuple[Any, ...]]:
            # Probes by key (no anti-join a planner could turn into a scan of agent_runs).
            rows = executor.rows(Stream.select(Stream.id, Stream.run_id).where(Stream.id.in_(keys),
                                                                               Stream.created_at < cutoff))
            runs = set(_select_in(executor, Run.run_id, Run.run_id, [r for _, r in rows]))
            return [(i, r) for i, r in rows if r not in runs]

        def orphan_events_in(keys: Sequence[Any]) -> List[Tuple[Any, ...]]:
            known = set(_select_in(executor, Run.run_id, Run.run_id, keys))
            known.update(_select_in(executor, Stream.run_id, Stream.run_id, keys))
            strays = [k for k in keys if k not in known]
            if not strays:
                return []
            return executor.rows(Event.select(Event.run_id).distinct().where(Event.run_id.in_(strays),
                                                                             *stray))

        windows: Tuple[Tuple[peewee.Field, bool, Callable[[List[Tuple[Any, ...]]], None],
                             Callable[[Sequence[Any]], List[Tuple[Any, ...]]]], ...] = (
            (Stream.id, False, prune_orphan_streams, orphan_streams_in),
            (Event.run_id, True, prune_orphan_events, orphan_events_in),
        )
        for key, distinct, prune, find in windows:
            for keys in _key_window(executor, key, scan, distinct):
                with executor.transaction():
                    rows = find(keys)
                    if rows:
                        prune(rows)
                if rows:
                    report.batches += 1
                    report.seconds = time.monotonic() - started
                    if progress is not None:
                        progress(report)

    report.seconds = time.monotonic() - started
    logger.info("%s", report.summary())
    return report


def _key_window(executor: Executor, key: peewee.Field, size: int, distinct: bool) -> Iterator[List[Any]]:
    """Up to `size` consecutive values of the indexed column `key`, from a random place in its
    order and wrapping around (all of them when the table holds no more than `size`), in
    pages of at most _IN_CHUNK read one at a time: memory stays bounded however big `size`."""
    if size <= 0:
        return
    model = key.model
    # Two statements: SQLite reads one end of the index for MIN or MAX alone, the whole of it for both.
    (low,), = executor.rows(model.select(peewee.fn.MIN(key)))
    (high,), = executor.rows(model.select(peewee.fn.MAX(key)))
    if low is None or high is None:
        return
    start = _somewhere_between(str(low), str(high), random.Random())
    left = size
    for first, stop in ((key >= start, None), (key < start, start)):
        last: Any = None
        while left > 0:
            condition = first if last is None else (key > last)
            if stop is not None:
                condition = condition & (key < stop)
            query = model.select(key).where(condition).order_by(key).limit(min(left, _IN_CHUNK))
            page = [k for (k,) in executor.rows(query.distinct() if distinct else query)]
            if not page:
                break
            left -= len(page)
            last = page[-1]
            yield page


def _somewhere_between(low: str, high: str, rng: random.Random) -> str:
    """A string between `low` and `high` in code-point order, roughly uniform over the keys
    when they share a shape (``run-000123``, UUIDs): a place to start an orphan window."""
    prefix = 0
    while prefix < min(len(low), len(high)) and low[prefix] == high[prefix]:
        prefix += 1
    if prefix >= len(high):
        return low
    first = ord(low[prefix]) if prefix < len(low) else 0
    alphabet = sorted(set(low[prefix + 1:] + high[prefix + 1:])) or ["0"]
    tail = "".join(rng.choice(alphabet) for _ in range(max(len(high) - prefix - 1, 0)))
    return high[:prefix] + chr(rng.randint(first, ord(high[prefix]))) + tail


def reap_stale(storage: StorageParts, stale_after: _dt.timedelta, now_ms: Optional[int] = None,
               *, batch_size: int = 1000, streams: Optional[Streams] = None, dry_run: bool = False) -> int:
    """Mark runs still ``running`` but silent for longer than `stale_after` as failed.

    The trace a crashed worker leaves is a run that says running forever. Each such run
    (``updatedAt`` before now - `stale_after`) becomes ``failed`` with ``finishedAt`` and
    ``updatedAt`` = now and a final event ``{"type": "RUN_ERROR", "code": "STALE_RUN",
    "message": ..., "timestamp": now}``; the same event is appended to its open stream, which
    is then closed, so followers read why the run ended and stop waiting. The UPDATEs are
    conditional (still running, still stale), so a run that finishes meanwhile is kept; a
    stream closed by someone else meanwhile stays closed, without the event.

    :param storage: the storage object.
    :param stale_after: how long a running run may go without an update, a `timedelta`. A
        tracked run (`runs.track`) updates itself every ``heartbeat_interval`` seconds (60 by
        default) while it emits or checks for aborts: keep `stale_after` well above that.
    :param now_ms: "now" in epoch ms (default: the clock).
    :param batch_size: runs per transaction.
    :param streams: the storage's `Streams`, which appends the event (default: one of its own).
    :param dry_run: count the runs it would mark failed, write nothing.
    :returns: how many runs were marked failed (with `dry_run`: would be).
    """
    if now_ms is None:
        now_ms = clock_ms()
    cutoff = _cutoff(stale_after, now_ms, "stale_after")
    now = now_ms
    executor = storage.executor
    m = storage.models
    Run, Stream = m.run, m.stream
    final_event = {
        "type": "RUN_ERROR",
        "message": (f"run marked failed by reap_stale: still running but not updated for more than "
                    f"{_describe(stale_after)} (since {ms_to_iso(cutoff)}); its worker is presumed dead"),
        "code": STALE_RUN_CODE,
        "timestamp": now,
    }
    if streams is None:
        streams = Streams(Tables(executor, m))
    stale = [Run.status == "running", Run.updated_at < cutoff]
    if dry_run:
        (count,), = executor.rows(Run.select(_COUNT).where(*stale))
        return int(count)
    reaped = 0
    last: Optional[str] = None
    while True:
        with executor.transaction():
            # Unordered: every run of a page stops matching (failed now, or changed meanwhile), and
            # ORDER BY run_id would lead SQLite to read the run_id index instead of the status one.
            ids = [r for (r,) in executor.rows(_page(Run.select(Run.run_id).where(*stale), Run.run_id, last,
                                                     batch_size, ordered=False))]
            if not ids:
                break
            for chunk in _chunks(ids):
                reaped += executor.execute_query(
                    Run.update(status="failed", final_event=final_event, finished_at=now, updated_at=now)
                    .where(Run.run_id.in_(chunk), *stale)).rowcount
                # Only the streams of runs this call just failed (a finished run closes its own):
                # each gets the RUN_ERROR as its last event, then is closed.
                ours = (Run.select(peewee.SQL("1"))
                        .where(Run.run_id == Stream.run_id, Run.status == "failed", Run.finished_at == now))
                open_streams = [r for (r,) in executor.rows(Stream.select(Stream.run_id).where(
                    Stream.run_id.in_(chunk), Stream.status == "open", fn_exists(ours)))]
                for run_id in open_streams:
                    try:
                        streams.append(run_id, final_event)
                    except ConflictError:
                        # Closed by someone since the SELECT above: it stays closed, without our event.
                        if (streams.get(run_id) or {}).get("status") == "open":
                            raise
                        logger.info("reap_stale: stream %r was closed meanwhile; its run is failed all the "
                                    "same, its stream left as it was closed", run_id)
                if open_streams:
                    executor.execute_query(Stream.update(status="closed", closed_at=now, updated_at=now)
                                           .where(Stream.run_id.in_(open_streams), Stream.status == "open"))
        last = ids[-1]
        if len(ids) < batch_size:
            break
    if reaped:
        logger.warning("reaped %d stale runs (running, no update since %s)", reaped, ms_to_iso(cutoff))
    return reaped


def stats(storage: StorageParts) -> Dict[str, Any]:
    """Rows per table, runs per status, and the oldest and newest run (by ``startedAt``).

    :returns: ``{"tables": {table: rows}, "runs": {status: count}, "oldestRun": ms | None,
        "newestRun": ms | None}``, timestamps in epoch ms.
    """
    executor, m = storage.executor, storage.models
    tables = {model._meta.table_name: executor.rows(model.select(_COUNT))[0][0]
              for model in m.in_dependency_order()}
    Run = m.run
    by_status = {status: count for status, count in
                 executor.rows(Run.select(Run.status, _COUNT).group_by(Run.status).order_by(Run.status))}
    (oldest, newest), = executor.rows(Run.select(peewee.fn.MIN(Run.started_at),
                                                 peewee.fn.MAX(Run.started_at)))
    return {
        "tables": tables,
        "runs": by_status,
        # MIN/MAX come back as the driver reads the column: decode them as a mapper would.
        "oldestRun": _as_ms(executor, oldest),
        "newestRun": _as_ms(executor, newest),
    }


_COUNT = peewee.fn.COUNT(peewee.SQL("*"))


def _as_ms(executor: Executor, value: Any) -> Optional[int]:
    if value is None or isinstance(value, int):
        return value
    ms: int = executor.dialect.decode_ts(value)
    return ms


# -- helpers ------------------------------------------------------------------------------

def fn_exists(query: peewee.Query) -> Any:
    """``EXISTS (query)``."""
    return peewee.fn.EXISTS(query)


def _page(query: peewee.Query, key: peewee.Field, after: Optional[str], size: int,
          ordered: bool = True) -> peewee.Query:
    """The next `size` rows after key `after`, in key order (keyset pagination); unordered,
    any `size` rows (for a loop whose every page stops matching: deleted or updated)."""
    if not ordered:
        return query.limit(size)
    if after is not None:
        query = query.where(key > after)
    return query.order_by(key).limit(size)


def _chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(ids), _IN_CHUNK):
        yield ids[start:start + _IN_CHUNK]


def _select_in(executor: Executor, column: peewee.Field, key: peewee.Field, ids: Sequence[Any]) -> List[Any]:
    """`column` of the rows whose `key` is in `ids`."""
    found: List[Any] = []
    for chunk in _chunks(ids):
        found += [value for (value,) in executor.rows(column.model.select(column).where(key.in_(chunk)))]
    return found


def _delete(executor: Executor, model: Any, key: peewee.Field, ids: Sequence[Any],
            extra: Sequence[Any] = ()) -> int:
    """DELETE the rows of `model` whose `key` is in `ids` and that match `extra`; how many."""
    return sum(int(executor.execute_query(model.delete().where(key.in_(chunk), *extra)).rowcount)
               for chunk in _chunks(ids))


def _delete_or_count(executor: Executor, model: Any, key: peewee.Field, ids: Sequence[Any], dry_run: bool,
                     extra: Sequence[Any] = ()) -> int:
    """`_delete`, or with `dry_run` COUNT what it would delete."""
    if not dry_run:
        return _delete(executor, model, key, ids, extra)
    return sum(int(executor.rows(model.select(_COUNT).where(key.in_(chunk), *extra))[0][0])
               for chunk in _chunks(ids))


def _check_statuses(statuses: Iterable[str], include_interrupted: bool) -> Tuple[str, ...]:
    if isinstance(statuses, str):
        statuses = (statuses,)
    chosen = list(dict.fromkeys(statuses))
    for status in chosen:
        if status == "running":
            raise QueryError("runs", "running runs are never pruned (reap_stale marks dead ones failed)")
        if status not in FINISHED_STATUSES:
            allowed = ", ".join(s for s in RUN_STATUSES if s != "running")
            raise QueryError("runs", f"unknown run status {status!r} to prune (expected one of {allowed})")
    if "interrupted" in chosen and not include_interrupted:
        raise QueryError("runs", "interrupted runs wait for a human to resume them: "
                                 "pass include_interrupted=True to prune them")
    if include_interrupted and "interrupted" not in chosen:
        chosen.append("interrupted")
    if not chosen:
        raise QueryError("runs", "no status to prune")
    return tuple(chosen)


def _ms(delta: _dt.timedelta) -> int:
    return delta // _dt.timedelta(milliseconds=1)


def _cutoff(delta: Any, now_ms: Optional[int], name: str) -> int:
    if not isinstance(delta, _dt.timedelta):
        raise TypeError(f"{name} must be a datetime.timedelta, got {type(delta).__name__}")
    if delta < _dt.timedelta(0):
        raise ValueError(f"{name} must not be negative, got {delta}")
    if now_ms is None:
        now_ms = clock_ms()
    # Stored timestamps lie in 0..MAX_TIMESTAMP_MS (1970..9999); a cutoff outside would not encode.
    return min(max(now_ms - _ms(delta), 0), MAX_TIMESTAMP_MS)


def _describe(delta: _dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{delta.total_seconds():g}s"
