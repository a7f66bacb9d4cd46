"""Pruning: finished runs deleted with their streams and stream events, in batches.

The operational job a cron job runs (``better-agent-peewee prune``), written as a plain
function over a storage object so Python code can call it directly::

    from datetime import timedelta
    report = prune_runs(storage, timedelta(days=7))
    log.info(report.summary())

Pruning works in batches, each batch one transaction that deletes a set of runs together
with their stream and stream events, so a process killed part-way leaves every remaining
run whole and the next run finishes the job. Memory (threads and messages) is never touched.
Batches are chosen by keyset and deleted by an explicit id list (batches.py). Reaping the
runs a dead worker left running is reap.py's job, the command line's row counts stats.py's.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import logging
import random
import time
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import peewee

from .batches import IN_CHUNK, cutoff, delete_in, delete_or_count, exists, page, select_in
from .checks import is_int
from .domains import ALL_DOMAINS
from .errors import QueryError
from .executor import Executor
from .records import FINISHED_STATUSES, RUN_STATUSES
from .tables import StorageParts
from .timestamps import ms_to_iso

logger = logging.getLogger(__name__)

__all__ = ["PruneReport", "prune_runs", "ORPHAN_SCAN"]

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
    Threads and messages are never touched. Without the streams domain (`peewee_storage(db,
    domains=...)`), only the runs are deleted.

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
    before = cutoff(older_than, now_ms, "older_than")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    pruner = _Pruner(storage, PruneReport(dry_run=dry_run, cutoff_ms=before), chosen, batch_size, progress)
    for status in chosen:
        pruner.pages(f"finished runs ({status})", functools.partial(pruner.finished_runs, status),
                     pruner.prune_finished)
    if pruner.streams_here and orphan_scan is None:  # (no streams domain: no orphan to look for)
        pruner.pages("orphan streams", pruner.orphan_streams, pruner.prune_orphan_streams)
        pruner.pages("orphan events", pruner.orphan_events, pruner.prune_orphan_events)
    elif pruner.streams_here and orphan_scan is not None:
        pruner.sweep(orphan_scan + 10 * pruner.report.runs)
    return pruner.done()


#: A page of rows: the first column is the page's key.
Rows = List[Tuple[Any, ...]]


class _Pruner:
    """One `prune_runs` call: what it deletes, page by page, and its running totals (`report`).

    Each phase is a keyset-paged SELECT of ids (first column = the page key) and what to do
    with one page. Every DELETE re-checks its condition, so a row that changed since the
    SELECT (a run resumed, a run written for an orphan stream) is kept, and only what was
    really deleted has its dependants deleted (on MySQL the SELECT reads a snapshot, and on
    PostgreSQL the SELECT and the DELETE see different moments).
    """

    def __init__(self, storage: StorageParts, report: PruneReport, statuses: Sequence[str], batch_size: int,
                 progress: Optional[Callable[[PruneReport], None]]) -> None:
        self.report = report
        self._started = time.monotonic()
        self._executor = storage.executor
        self._size = batch_size
        self._progress = progress
        #: False when the storage was built without the streams domain: runs alone are deleted.
        self.streams_here = "streams" in getattr(storage, "domains", ALL_DOMAINS)
        m = storage.models
        Run, Stream, Event = self._run, self._stream, self._event = m.run, m.stream, m.stream_event
        before = report.cutoff_ms
        self._finished = [Run.status.in_(statuses), Run.finished_at.is_null(False), Run.finished_at < before]
        self._orphan = [Stream.created_at < before, self._no_run(Stream.run_id)]
        no_stream = ~exists(Stream.select(peewee.SQL("1")).where(Stream.run_id == Event.run_id))
        self._stray = [Event.timestamp < before, self._no_run(Event.run_id), no_stream]

    def _no_run(self, run_id: peewee.Field) -> Any:
        return ~exists(self._run.select(peewee.SQL("1")).where(self._run.run_id == run_id))

    # -- the phases: a page's SELECT, and what to do with the page ---------------------------

    def finished_runs(self, status: str, after: Optional[Tuple[Any, ...]]) -> peewee.Query:
        """The next page of runs of `status` that finished before the cutoff, oldest first."""
        # One status at a time, oldest first: the order of bap_agent_runs_status_finished_idx, so
        # every planner walks that index and stops after a page. Unordered (or with several
        # statuses), PostgreSQL may estimate that old finished runs are common (it multiplies the
        # selectivities of status and finishedAt) and pick a sequential scan for the LIMIT,
        # reading every kept run when the old ones are few or lie at the end of the table.
        Run = self._run
        query: peewee.Query = Run.select(Run.run_id, Run.finished_at).where(
            Run.status == status, Run.finished_at.is_null(False), Run.finished_at < self.report.cutoff_ms)
        if not self.report.dry_run:  # deleted rows stop matching: no keyset needed
            return query.order_by(Run.finished_at).limit(self._size)
        if after is not None:  # keyset on (finishedAt, runId): runs can finish in the same ms
            # The stored value as the driver gave it, unconverted: rounded to our ms, a value
            # with finer digits (PostgreSQL keeps microseconds; another writer's) would
            # still be after its own bound, and the page would repeat for ever.
            run_id, at = after[0], peewee.Value(after[1], converter=False)
            query = query.where((Run.finished_at > at) | ((Run.finished_at == at) & (Run.run_id > run_id)))
        return query.order_by(Run.finished_at, Run.run_id).limit(self._size)

    def prune_finished(self, rows: Rows) -> None:
        """Delete a page of finished runs, then the streams and events of those really deleted."""
        Run, report, executor = self._run, self.report, self._executor
        ids = sorted(r for r, _ in rows)  # key order: the DELETEs then walk each index in order
        if report.dry_run:
            report.runs += len(ids)
            gone = ids
        else:
            report.runs += delete_in(executor, Run, Run.run_id, ids, self._finished)
            kept = set(select_in(executor, Run.run_id, Run.run_id, ids))
            gone = [r for r in ids if r not in kept]
        if self.streams_here:
            report.events += self._delete_or_count(self._event, self._event.run_id, gone)
            report.streams += self._delete_or_count(self._stream, self._stream.run_id, gone)

    def orphan_streams(self, after: Optional[Tuple[Any, ...]]) -> peewee.Query:
        """The next page of streams whose run no longer exists, created before the cutoff."""
        Stream = self._stream
        return page(Stream.select(Stream.id, Stream.run_id).where(*self._orphan), Stream.id,
                    None if after is None else after[0], self._size)

    def prune_orphan_streams(self, rows: Rows) -> None:
        """Delete a page of orphan streams, then the events of those really deleted."""
        Stream, report = self._stream, self.report
        ids = [stream_id for stream_id, _ in rows]
        if report.dry_run:
            report.streams += len(ids)
            gone = [run_id for _, run_id in rows]
        else:
            report.streams += delete_in(self._executor, Stream, Stream.id, ids, self._orphan)
            kept = set(select_in(self._executor, Stream.id, Stream.id, ids))
            gone = [run_id for stream_id, run_id in rows if stream_id not in kept]
        report.events += self._delete_or_count(self._event, self._event.run_id, gone)

    def orphan_events(self, after: Optional[Tuple[Any, ...]]) -> peewee.Query:
        """The next page of run ids of events with neither run nor stream, stamped before the cutoff."""
        Event = self._event
        return page(Event.select(Event.run_id).distinct().where(*self._stray), Event.run_id,
                    None if after is None else after[0], self._size)

    def prune_orphan_events(self, rows: Rows) -> None:
        """Delete the stray events of a page of run ids."""
        self.report.events += self._delete_or_count(self._event, self._event.run_id, [r for (r,) in rows],
                                                    self._stray)

    def _delete_or_count(self, model: Any, key: peewee.Field, ids: Sequence[Any],
                         extra: Sequence[Any] = ()) -> int:
        """`delete_in`, or in a dry run COUNT what it would delete."""
        return delete_or_count(self._executor, model, key, ids, self.report.dry_run, extra)

    # -- running the phases -------------------------------------------------------------------

    def pages(self, name: str, select: Callable[[Optional[Tuple[Any, ...]]], peewee.Query],
              prune: Callable[[Rows], None]) -> None:
        """Every page `select` finds, each pruned in a transaction of its own."""
        executor, last = self._executor, None
        while True:
            # One transaction per page: a kill part-way loses (rolls back) at most this page,
            # never half of a run's data. On SQLite it holds the write lock from the start.
            with executor.transaction():
                rows = executor.rows(select(last))
                if not rows:
                    break
                prune(rows)
            last = rows[-1]
            self._counted()
            logger.debug("prune %s: batch of %d, totals %s", name, len(rows), self.report)
            if len(rows) < self._size:
                break

    def sweep(self, scan: int) -> None:
        """The orphan sweeps, bounded: a window of `scan` keys (a random place in the key order),
        examined page by page. The DELETEs re-check as the pages' do."""
        windows: Sequence[Tuple[peewee.Field, bool, Callable[[Sequence[Any]], Rows], Callable[[Rows], None]]]
        windows = ((self._stream.id, False, self._orphan_streams_in, self.prune_orphan_streams),
                   (self._event.run_id, True, self._orphan_events_in, self.prune_orphan_events))
        for key, distinct, find, prune in windows:
            for keys in _key_window(self._executor, key, scan, distinct):
                with self._executor.transaction():
                    rows = find(keys)
                    if rows:
                        prune(rows)
                if rows:
                    self._counted()

    def _orphan_streams_in(self, keys: Sequence[Any]) -> Rows:
        # Probes by key (no anti-join a planner could turn into a scan of agent_runs).
        Stream, Run, executor = self._stream, self._run, self._executor
        rows = executor.rows(Stream.select(Stream.id, Stream.run_id).where(
            Stream.id.in_(keys), Stream.created_at < self.report.cutoff_ms))
        runs = set(select_in(executor, Run.run_id, Run.run_id, [r for _, r in rows]))
        return [(i, r) for i, r in rows if r not in runs]

    def _orphan_events_in(self, keys: Sequence[Any]) -> Rows:
        executor, Event = self._executor, self._event
        known = set(select_in(executor, self._run.run_id, self._run.run_id, keys))
        known.update(select_in(executor, self._stream.run_id, self._stream.run_id, keys))
        strays = [k for k in keys if k not in known]
        if not strays:
            return []
        return executor.rows(Event.select(Event.run_id).distinct().where(Event.run_id.in_(strays),
                                                                         *self._stray))

    def _counted(self) -> None:
        """One more batch done: the totals so far to `progress`."""
        self.report.batches += 1
        self.report.seconds = time.monotonic() - self._started
        if self._progress is not None:
            self._progress(self.report)

    def done(self) -> PruneReport:
        """The report, timed and logged."""
        self.report.seconds = time.monotonic() - self._started
        logger.info("%s", self.report.summary())
        return self.report


def _key_window(executor: Executor, key: peewee.Field, size: int, distinct: bool) -> Iterator[List[Any]]:
    """Up to `size` consecutive values of the indexed column `key`, from a random place in its
    order and wrapping around (all of them when the table holds no more than `size`), in
    pages of at most IN_CHUNK read one at a time: memory stays bounded however big `size`."""
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
            query = model.select(key).where(condition).order_by(key).limit(min(left, IN_CHUNK))
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
