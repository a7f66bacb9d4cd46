"""Memory retention: delete threads idle for a while, with their messages (`storage.memory.prune_threads`).

The job a cron line runs (``better-agent-peewee prune --threads-idle-for 90d``), as Django's
``clearsessions`` is for sessions. Threads are chosen by keyset on ``(updatedAt, id)``, oldest
first (an index range: ``bap_threads_updated_idx``, or ``bap_threads_agent_updated_idx`` for
one agent), so a prune costs what it deletes, not what the tables keep. Each page is one
transaction that locks the threads it deletes, then deletes their messages and the threads,
so a kill part-way leaves every thread whole or gone, and running it again finishes the job.
A thread with a running run is never deleted, nor one that was updated meanwhile.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import peewee

from .batches import chunks, delete_or_count
from .batches import cutoff as cutoff_of
from .checks import is_int
from .domains import ALL_DOMAINS
from .records import check_key
from .tables import StorageParts
from .timestamps import ms_to_iso

logger = logging.getLogger(__name__)

__all__ = ["ThreadPruneReport", "prune_threads"]

Rows = List[Tuple[Any, ...]]


@dataclasses.dataclass
class ThreadPruneReport:
    """What `prune_threads` deleted (or, with ``dry_run``, would delete)."""

    #: Threads deleted.
    threads: int = 0
    #: Messages deleted: those of the deleted threads.
    messages: int = 0
    #: True when nothing was deleted and the numbers say what would have been.
    dry_run: bool = False
    #: Transactions (batches) it took.
    batches: int = 0
    #: Wall-clock seconds.
    seconds: float = 0.0
    #: The cutoff, epoch ms: threads not updated since were pruned.
    cutoff_ms: int = 0

    def summary(self) -> str:
        """One line for a log or a terminal, e.g. ``pruned 12 threads, 340 messages idle since ...``."""
        verb = "would prune" if self.dry_run else "pruned"
        return (f"{verb} {self.threads} threads, {self.messages} messages idle since "
                f"{ms_to_iso(self.cutoff_ms)} in {self.batches} batches ({self.seconds:.2f}s)"
                f"{' [dry run]' if self.dry_run else ''}")


def idle_cutoff(idle_for: Any, now_ms: Optional[int] = None) -> int:
    """now - `idle_for` in epoch ms; `idle_for` must be a positive `timedelta`."""
    if isinstance(idle_for, _dt.timedelta) and idle_for <= _dt.timedelta(0):
        raise ValueError(f"idle_for must be a positive duration, got {idle_for}")
    return cutoff_of(idle_for, now_ms, "idle_for")


def prune_threads(storage: StorageParts, idle_for: _dt.timedelta, *, agent_name: Optional[str] = None,
                  batch_size: int = 1000, dry_run: bool = False, now_ms: Optional[int] = None,
                  progress: Optional[Callable[[ThreadPruneReport], None]] = None) -> ThreadPruneReport:
    """Delete the threads not updated for `idle_for`, with their messages; what was deleted.

    A thread with a running run is kept (a run that starts also sets its thread's
    ``updatedAt``, so a thread in use is not idle). Each batch is one transaction. Without the
    runs domain (`peewee_storage(db, domains=...)`) there is no running run to respect.

    :param storage: the storage object (`peewee_storage`), or anything with its executor and models.
    :param idle_for: how long a thread may go without an update, a positive `timedelta`.
    :param agent_name: only this agent's threads (None: every agent's).
    :param batch_size: threads per transaction.
    :param dry_run: count what would be deleted, delete nothing.
    :param now_ms: "now" in epoch ms (default: the clock), for reproducible jobs and tests.
    :param progress: called with the running totals after every batch.
    """
    cutoff = idle_cutoff(idle_for, now_ms)
    if agent_name is not None:
        check_key("memoryThreads", "agentName", agent_name)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    started = time.monotonic()
    report = ThreadPruneReport(dry_run=dry_run, cutoff_ms=cutoff)
    idle = _idle(storage, cutoff, agent_name)
    last: Optional[Tuple[Any, Any]] = None
    while True:
        with storage.executor.transaction():
            rows = _page(storage, idle, last, batch_size)
            if not rows:
                break
            _prune_page(storage, idle, sorted(thread_id for thread_id, _ in rows), report)
        last = (rows[-1][0], rows[-1][1])
        report.batches += 1
        report.seconds = time.monotonic() - started
        logger.debug("prune threads: batch of %d, totals %s", len(rows), report)
        if progress is not None:
            progress(report)
        if len(rows) < batch_size:
            break
    report.seconds = time.monotonic() - started
    logger.info("%s", report.summary())
    return report


def _idle(storage: StorageParts, cutoff: int, agent_name: Optional[str]) -> List[Any]:
    """The condition of an idle thread: not updated since `cutoff`, of `agent_name`, no running run
    (when the runs domain is here)."""
    Thread, Run = storage.models.thread, storage.models.run
    idle: List[Any] = [Thread.updated_at < cutoff]
    if agent_name is not None:
        idle.append(Thread.agent_name == agent_name)
    if "runs" in getattr(storage, "domains", ALL_DOMAINS):
        busy = Run.select(peewee.SQL("1")).where((Run.thread_id == Thread.id) & (Run.status == "running"))
        idle.append(~peewee.fn.EXISTS(busy))
    return idle


def _page(storage: StorageParts, idle: List[Any], after: Optional[Tuple[Any, Any]], size: int) -> Rows:
    """The next `size` idle threads (id, updatedAt) after `after`, oldest first (keyset: threads
    kept for a running run stay idle, so the page after them must start past them)."""
    Thread = storage.models.thread
    query = Thread.select(Thread.id, Thread.updated_at).where(*idle)
    if after is not None:  # the stored value as the driver gave it (see prune_runs)
        at = peewee.Value(after[1], converter=False)
        query = query.where((Thread.updated_at > at) | ((Thread.updated_at == at) & (Thread.id > after[0])))
    return storage.executor.rows(query.order_by(Thread.updated_at, Thread.id).limit(size))


def _prune_page(storage: StorageParts, idle: List[Any], ids: List[Any], report: ThreadPruneReport) -> None:
    """Delete (or count) the threads `ids` with their messages, inside the page's transaction."""
    executor, Thread, Message = storage.executor, storage.models.thread, storage.models.message
    # Re-checked and locked until COMMIT: a thread updated or taken by a run since the page is kept,
    # and a run starting now waits, then finds the thread gone (SQLite: one writer at a time anyway).
    if not report.dry_run and not executor.dialect.single_writer:
        ids = sorted(_in(executor, Thread.select(Thread.id).where(*idle).for_update(), Thread.id, ids))
    # By key alone: the rows are locked (or SQLite's one writer holds the lock), and a re-check here
    # could keep a thread whose messages the statement before deleted (a run committed in between).
    report.messages += delete_or_count(executor, Message, Message.thread, ids, report.dry_run)
    report.threads += delete_or_count(executor, Thread, Thread.id, ids, report.dry_run)


def _in(executor: Any, query: peewee.Query, key: peewee.Field, ids: Sequence[Any]) -> List[Any]:
    """The first column of `query`'s rows whose `key` is in `ids`."""
    return [row[0] for chunk in chunks(ids) for row in executor.rows(query.where(key.in_(chunk)))]
