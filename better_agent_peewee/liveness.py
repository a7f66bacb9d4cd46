"""Dead workers: which followed runs still say running but have sent no heartbeat for longer
than their followers' `stale_after`.

Every `LIVENESS_PAUSE` seconds the poller asks, in one statement per `STREAMS_PER_POLL`
followed runs (plain SQL on ``agent_runs``, the same on every database), which of them are
still ``running`` with an ``updatedAt`` older than that. Their followers take every event
stored so far, then end with reason ``"stale"`` (delivery.py). Only runs that have heartbeat
at least once (``updatedAt`` after ``startedAt``) are judged: a writer that never heartbeats
(Better Agent's own runtime) is never called dead.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Set

import peewee

from .dialects.polling import STREAMS_PER_POLL
from .driver_errors import first_line
from .errors import ConnectionLostError
from .timestamps import now_ms
from .watches import Watches

if TYPE_CHECKING:
    from .executor import Executor

logger = logging.getLogger(__name__)

__all__ = ["Liveness", "STALE_AFTER", "LIVENESS_PAUSE", "FIRST_LIVENESS"]

#: Seconds without a heartbeat (the run's ``updatedAt``) after which a follower of a running run ends
#: "stale" (its worker is presumed dead): `resume`'s default `stale_after`. Tracked runs heartbeat every
#: ``tracking.HEARTBEAT_INTERVAL`` (10) seconds, so a follower of a killed worker ends within about
#: STALE_AFTER + LIVENESS_PAUSE seconds.
STALE_AFTER = 40.0
#: Seconds between two liveness checks of the followed runs (one statement per STREAMS_PER_POLL runs).
LIVENESS_PAUSE = 5.0
#: Fewest seconds between a liveness check and the next one that a new follower brings forward.
FIRST_LIVENESS = 1.0


class Liveness:
    """The poller's liveness check of the followed runs, and when it is due."""

    def __init__(self, executor: Executor, models: Any) -> None:
        self._executor = executor
        self._models = models
        self._alive_at = 0.0  # when the next liveness check is due
        self._alive_last = -1.0  # when the last one ran
        self.checks = 0  # liveness statements run (for tests and benchmarks)
        self._enabled = True  # False once agent_runs cannot be read here (the runs domain elsewhere)

    def newcomer(self) -> None:
        """A follower with a `stale_after` arrived (a reconnecting browser): judge it soon."""
        self._alive_at = min(self._alive_at, self._alive_last + FIRST_LIVENESS)

    def due(self) -> bool:
        """True when a check is due now (then the next one is LIVENESS_PAUSE away, or sooner)."""
        now = time.monotonic()
        if now < self._alive_at:
            return False
        self._alive_at = now + LIVENESS_PAUSE
        return True

    def check(self, watches: Watches) -> Set[str]:
        """Mark the watches of followed runs whose worker is presumed dead (still running, no
        heartbeat for their `stale_after`); the run ids marked, to be polled now (their followers
        end "stale" once they have every event stored)."""
        with watches.lock:
            limits = {run_id: min(w.stale_after for w in ws if w.stale_after is not None)
                      for run_id, ws in watches.by_run.items()
                      if any(w.stale_after is not None and not w.stale for w in ws)}
        if not limits or not self._enabled:
            return set()
        now = now_ms()
        self._alive_last = time.monotonic()
        shortest = min(limits.values())
        # A short stale_after (tests, impatient apps) is checked more often than LIVENESS_PAUSE.
        self._alive_at = time.monotonic() + min(LIVENESS_PAUSE, shortest / 4)
        try:
            found = self._silent(sorted(limits), now - int(shortest * 1000))
        except peewee.DatabaseError as exc:
            if isinstance(exc, ConnectionLostError) or self._executor.dialect.is_connection_lost(exc):
                raise  # (the round fails and is tried again, as a poll's would)
            if not self._executor.dialect.is_missing_table(exc):
                # (a timeout, a cluster node not ready: this round fails, the next one tries again)
                logger.warning("stream poller: liveness check failed (next try in %.0f s): %s",
                               LIVENESS_PAUSE, first_line(exc))
                return set()
            # No agent_runs here (a storage of the streams domain only, its runs kept elsewhere):
            # followers end only when their streams do, as before.
            logger.warning("stream poller: cannot read agent_runs (%s); followers here will not end "
                           "\"stale\"", first_line(exc))
            self._enabled = False
            return set()
        marked: Set[str] = set()
        with watches.lock:
            for run_id, updated in found.items():
                for w in watches.by_run.get(run_id, ()):
                    if w.stale_after is not None and not w.stale and now - updated > w.stale_after * 1000:
                        w.stale = True
                        marked.add(run_id)
            watches.stale_runs |= marked
        if marked:
            logger.info("stream poller: %d followed run(s) sent no heartbeat for their stale_after; "
                        "their followers end \"stale\": %s", len(marked), sorted(marked)[:10])
        return marked

    def _silent(self, ids: Any, cutoff: int) -> Dict[str, int]:
        """Run id -> updatedAt (epoch ms) of the runs of `ids` still running, heartbeat before `cutoff`."""
        Run = self._models.run
        decode = self._executor.dialect.decode_ts
        found: Dict[str, int] = {}
        for start in range(0, len(ids), STREAMS_PER_POLL):
            query = Run.select(Run.run_id, Run.updated_at).where(
                Run.run_id.in_(ids[start:start + STREAMS_PER_POLL]), Run.status == "running",
                Run.updated_at < cutoff, Run.updated_at > Run.started_at)
            self.checks += 1
            for run_id, updated in self._executor.rows(query):
                found[run_id] = updated if isinstance(updated, int) else decode(updated)
        return found
