"""Run records: start, finish, abort and the two lookups Better Agent makes (CONTRACT 4).

A run is written `running` when it starts and rewritten when it ends. Aborting is a
request: it stamps `abortRequestedAt` on a running run, and the worker executing the
run notices (`abort_requested`) between steps and stops. The stamp is one conditional
UPDATE, so of two callers racing to abort the same run exactly one is told it won.
"""
from __future__ import annotations

import datetime
import logging
from typing import Any, Dict, Mapping, Optional

import peewee

from .errors import NotFoundError, RecordError
from .prune import PruneReport, prune_runs, reap_stale
from .query import compile_statement, first_row, marker
from .records import FINAL_EVENT_TYPES, check_key, make_json_check, now_ms, storable_key
from .tables import TableAdapter, Tables

logger = logging.getLogger(__name__)

__all__ = ["Runs"]

_RUNS = "runs"
#: The final statuses, and the type of final event that goes with each (CONTRACT 4).
FINISHED = {"completed": "RUN_FINISHED", "interrupted": "RUN_FINISHED",
            "failed": "RUN_ERROR", "aborted": "RUN_ERROR"}


class Runs:
    """Better Agent's run records: `storage.runs`."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._tables = tables
        self._db: peewee.Database = tables.executor.database
        self._table: TableAdapter = tables.table(_RUNS)
        self._encode_ts = tables.executor.dialect.encode_ts
        self._check_json = make_json_check(tables.executor.dialect)
        R = tables.models.run
        # Only a running run that was not asked yet: the WHERE clause decides who wins a race.
        self._abort = compile_statement(self._db, R.update(
            {R.abort_requested_at: marker("now"), R.updated_at: marker("now")}).where(
            (R.run_id == marker("run")) & (R.status == "running") & R.abort_requested_at.is_null()))
        self._finish = compile_statement(self._db, R.update(
            {R.status: marker("status"), R.final_event: marker("final"), R.updated_at: marker("now"),
             R.finished_at: marker("now")}).where(R.run_id == marker("run")))
        self._abort_stamp = compile_statement(
            self._db, R.select(R.abort_requested_at).where(R.run_id == marker("run")))

    def get(self, run_id: str) -> Optional[Dict[str, Any]]:
        """The run record of `run_id`, or None."""
        return self._table.get(run_id)

    def start(self, run_id: str, agent_name: str, thread_id: Optional[str] = None,
              scope: Optional[str] = None, config: Any = None) -> Dict[str, Any]:
        """Write the `running` record of a run that starts now, and return it.

        :param config: the run's configuration (any JSON; stored as given, None as null).
        """
        now = now_ms()
        record: Dict[str, Any] = {"runId": run_id, "agentName": agent_name}
        if thread_id is not None:
            record["threadId"] = thread_id
        if scope is not None:
            record["scope"] = scope
        record.update(status="running", config=config, startedAt=now, updatedAt=now)
        self._table.set(run_id, record)
        return record

    def finish(self, run_id: str, status: str, final_event: Optional[Mapping[str, Any]] = None) -> None:
        """Record the end of a run: its final `status`, `finalEvent`, `updatedAt` and `finishedAt`.

        :param status: completed or interrupted (with a RUN_FINISHED event), failed or
            aborted (with a RUN_ERROR event carrying a message and maybe a code).
        :param final_event: the AG-UI event that ended the run, or None.
        :raises NotFoundError: there is no run `run_id`.
        """
        run_id = check_key(_RUNS, "runId", run_id)
        if type(status) is not str or status not in FINISHED:
            raise RecordError(_RUNS, "status", f"a run finishes as one of {', '.join(FINISHED)}, got {status!r:.80}")
        final = None
        if final_event is not None:
            kind = final_event.get("type") if isinstance(final_event, Mapping) else None
            if kind not in FINAL_EVENT_TYPES:
                raise RecordError(_RUNS, "finalEvent",
                                  f"must be an object whose type is RUN_FINISHED or RUN_ERROR, got {final_event!r:.80}")
            if kind != FINISHED[status]:
                raise RecordError(_RUNS, "finalEvent", f"a {status} run ends with a {FINISHED[status]} event, "
                                                       f"got {kind}")
            final = self._check_json(_RUNS, "finalEvent", dict(final_event))
        params = self._finish.params({"status": status, "final": final, "now": self._encode_ts(now_ms()),
                                      "run": run_id})
        if self._executor.execute(self._finish.sql, params).rowcount == 0 and self.get(run_id) is None:
            # (MySQL counts changed rows, not matched ones: 0 can also mean "already so".)
            raise NotFoundError(_RUNS, run_id, f"runs: cannot finish run {run_id!r}: it does not exist")

    def request_abort(self, run_id: str) -> bool:
        """Ask the worker executing `run_id` to stop; True if this call made the request.

        Sets `abortRequestedAt` (and `updatedAt`) only on a running run that was not asked
        yet, in one conditional UPDATE: of several callers racing, exactly one gets True.
        False means the run is not running or was already asked.

        :raises NotFoundError: there is no run `run_id`.
        """
        run_id = check_key(_RUNS, "runId", run_id)
        params = self._abort.params({"now": self._encode_ts(now_ms()), "run": run_id})
        # Not idempotent: a second run after a lost reply would answer False to the winner.
        if self._executor.execute(self._abort.sql, params, idempotent=False).rowcount == 1:
            logger.debug("abort requested for run %r", run_id)
            return True
        if self.get(run_id) is None:
            raise NotFoundError(_RUNS, run_id, f"runs: cannot abort run {run_id!r}: it does not exist")
        return False

    def abort_requested(self, run_id: str) -> bool:
        """True once an abort of `run_id` was requested: the check a worker makes between steps.

        One indexed read of one column. A run that does not exist reads as False, as in
        Better Agent's own abort check.
        """
        if not storable_key(run_id):
            return False
        row = first_row(self._executor.execute(self._abort_stamp.sql, self._abort_stamp.params({"run": run_id})))
        return row is not None and row[0] is not None

    def latest_for_thread(self, thread_id: str) -> Optional[Dict[str, Any]]:
        """The run of `thread_id` that started last, or None."""
        items = self._table.list({"where": {"threadId": thread_id}, "orderBy": {"startedAt": "desc"},
                                  "take": 1})["items"]
        return items[0] if items else None

    def running(self, agent_name: str, scope: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The running run of `agent_name` (in `scope`, when given) that started last, or None."""
        where: Dict[str, Any] = {"agentName": agent_name, "status": "running"}
        if scope is not None:
            where["scope"] = scope
        items = self._table.list({"where": where, "orderBy": {"startedAt": "desc"}, "take": 1})["items"]
        return items[0] if items else None

    def prune(self, older_than: datetime.timedelta, **options: Any) -> PruneReport:
        """Delete runs that finished more than `older_than` ago, with their streams and events.

        Options (statuses, batch_size, dry_run, ...) as `better_agent_peewee.prune.prune_runs`.
        """
        return prune_runs(self._tables, older_than, **options)

    def reap_stale(self, stale_after: datetime.timedelta) -> int:
        """Mark runs still `running` but not updated for `stale_after` as failed, closing their
        streams (what a crashed worker leaves behind); returns how many were marked.
        See `better_agent_peewee.prune.reap_stale`."""
        return reap_stale(self._tables, stale_after)
