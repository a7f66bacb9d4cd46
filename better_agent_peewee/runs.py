"""Run records: start, finish, abort and the two lookups Better Agent makes ("Runs" in docs/contract.md).

A run is written `running` when it starts and rewritten when it ends. Aborting is a
request: it stamps `abortRequestedAt` on a running run, and the worker executing the
run notices (`abort_requested`) between steps and stops (aborts.py). Starting, finishing
and the abort stamp are each one conditional statement, so of callers racing on the same
run exactly one is told it won: a second `start` of an id is refused, a run that already
ended is not finished again, and an abort is requested once. `track` lives a whole run
in one block (see tracking.py).
"""
from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import peewee

from .aborts import AbortRequest, Aborts, owned_by
from .errors import ConflictError, NotFoundError, RecordError
from .executor import Applied
from .heartbeats import Heartbeats
from .prune import PruneReport, prune_runs
from .query import compile_statement, marker
from .reap import reap_stale
from .records import FINAL_EVENT_OF, FINAL_EVENT_TYPES, check_key, make_json_check, now_ms, storable_key
from .tables import TableAdapter, Tables
from .tracking import ABORT_CHECK_INTERVAL, HEARTBEAT_INTERVAL, TrackedRun

if TYPE_CHECKING:
    from .memory import Memory
    from .streams import Streams


# AbortRequest and owned_by live in aborts.py; imported from here, as before, they still are.
__all__ = ["Runs", "AbortRequest", "owned_by"]

_RUNS = "runs"
#: The final statuses, and the type of final event that goes with each ("Runs" in docs/contract.md).
FINISHED = FINAL_EVENT_OF


class Runs:
    """Better Agent's run records: `storage.runs`.

    `track` and `reap_stale` also write the run's stream (and `track` its thread): they are
    given `memory` and `streams`, the storage's other parts.
    """

    def __init__(self, tables: Tables, memory: Optional[Memory], streams: Optional[Streams]) -> None:
        self._executor = tables.executor
        self._memory = memory
        self._streams = streams
        self._tables = tables
        self._db: peewee.Database = tables.executor.database
        self._table: TableAdapter = tables.table(_RUNS)
        self._encode_ts = tables.executor.dialect.encode_ts
        self._check_json = make_json_check(tables.executor.dialect)
        self._aborts = Aborts(tables)
        R = tables.models.run
        self._finish = compile_statement(self._db, R.update(
            {R.status: marker("status"), R.final_event: marker("final"), R.updated_at: marker("now"),
             R.finished_at: marker("now")}).where((R.run_id == marker("run")) & (R.status == "running")))
        # A new run's record, stored only if no run has the id (the unique run_id index decides).
        table = self._table
        fields = {f.column_name: f for f in table.model._meta.sorted_fields}
        self._insert = compile_statement(self._db, tables.executor.dialect.skip_duplicates(
            table.model.insert({fields[c]: marker(c) for c in table.spec.columns})))
        if self._insert.names != table.spec.columns:
            raise AssertionError(f"run insert parameters out of column order: {self._insert.plan}")
        self._heartbeat = compile_statement(self._db, R.update({R.updated_at: marker("now")}).where(
            (R.run_id == marker("run")) & (R.status == "running")))
        #: The thread that keeps tracked runs' ``updatedAt`` fresh while their blocks run.
        self.heartbeats = Heartbeats(tables.executor, tables.models)

    def get(self, run_id: str) -> Optional[Dict[str, Any]]:
        """The run record of `run_id`, or None."""
        return self._table.get(run_id)

    def start(self, run_id: str, agent_name: str, thread_id: Optional[str] = None,
              scope: Optional[str] = None, config: Any = None, *, replace: bool = False) -> Dict[str, Any]:
        """Write the `running` record of a run that starts now, and return it.

        :param config: the run's configuration (any JSON; stored as given, None as null).
        :param replace: overwrite the record when a run `run_id` already exists (whatever
            its status); by default that is refused.
        :raises ConflictError: a run `run_id` exists and `replace` is false (nothing is written).
        """
        now = now_ms()
        record: Dict[str, Any] = {"runId": run_id, "agentName": agent_name}
        if thread_id is not None:
            record["threadId"] = thread_id
        if scope is not None:
            record["scope"] = scope
        record.update(status="running", config=config, startedAt=now, updatedAt=now)
        if replace:
            self._table.set(run_id, record)
            return record
        row = self._table.to_row(run_id, record)  # validates: bad input raises before any write
        try:
            # Not idempotent: after a lost reply a second run would find its own row and refuse;
            # so the row is read back instead: ours (same start stamp and agent) means stored.
            stored = self._executor.execute(
                self._insert.sql, row, idempotent=False, resolve=lambda: self._read_back(
                    run_id, lambda r: r["startedAt"] == now and r["agentName"] == agent_name)).rowcount == 1
        except peewee.IntegrityError:  # MySQL: the duplicate raises instead of being skipped
            stored = False
        if not stored:
            existing = self.get(run_id)
            status = existing["status"] if existing else "gone again"
            raise ConflictError(f"runs: run {run_id!r} already exists ({status}); nothing was written. Use a "
                                f"new run id, or pass replace=True to start it over")
        return record

    def finish(self, run_id: str, status: str, final_event: Optional[Mapping[str, Any]] = None) -> bool:
        """Record the end of a running run: its final `status`, `finalEvent`, `updatedAt` and
        `finishedAt`; True if this call did.

        Only a `running` run is changed, in one conditional UPDATE: a run that already ended
        (finished by its worker, aborted, failed by `reap_stale`) keeps its outcome and the
        call returns False. Of callers racing to finish a run, exactly one gets True.

        :param status: completed or interrupted (with a RUN_FINISHED event), failed or
            aborted (with a RUN_ERROR event carrying a message and maybe a code).
        :param final_event: the AG-UI event that ended the run, or None.
        :raises NotFoundError: there is no run `run_id`.
        """
        run_id = check_key(_RUNS, "runId", run_id)
        if type(status) is not str or status not in FINISHED:
            raise RecordError(_RUNS, "status",
                              f"a run finishes as one of {', '.join(FINISHED)}, got {status!r:.80}")
        final = None
        if final_event is not None:
            kind = final_event.get("type") if isinstance(final_event, Mapping) else None
            if kind not in FINAL_EVENT_TYPES:
                raise RecordError(_RUNS, "finalEvent",
                                  "must be an object whose type is RUN_FINISHED or RUN_ERROR, "
                                  f"got {final_event!r:.80}")
            if kind != FINISHED[status]:
                raise RecordError(_RUNS, "finalEvent",
                                  f"a {status} run ends with a {FINISHED[status]} event, got {kind}")
            final = self._check_json(_RUNS, "finalEvent", dict(final_event))
        stamp = now_ms()
        params = self._finish.params({"status": status, "final": final, "now": self._encode_ts(stamp),
                                      "run": run_id})
        # Not idempotent: after a lost reply a second run would find the run ended and say False.
        # (The status changes from running, so even MySQL, which counts changed rows, says 1.)
        # After a lost reply the run is read back: ended with our stamp means this call did it.
        if self._executor.execute(self._finish.sql, params, idempotent=False, resolve=lambda: self._read_back(
                run_id, lambda r: r["status"] == status and r.get("finishedAt") == stamp,
                pending=lambda r: r["status"] == "running")).rowcount == 1:
            return True
        if self.get(run_id) is None:
            raise NotFoundError(_RUNS, run_id, f"runs: cannot finish run {run_id!r}: it does not exist")
        return False

    def request_abort(self, run_id: str) -> AbortRequest:
        """Ask the worker executing `run_id` to stop, and say what happened.

        Sets `abortRequestedAt` (and `updatedAt`) only on a running run that was not asked
        yet, in one conditional UPDATE: of several callers racing, exactly one gets
        `AbortRequest.REQUESTED`. The others get `ALREADY_REQUESTED`, or `NOT_RUNNING` when
        the run has ended. Only REQUESTED is true, so callers that test the answer as a
        bool read "this call made the request", as before.

        :raises NotFoundError: there is no run `run_id`.
        """
        return self._aborts.request(run_id, None)

    def abort_of(self, run_id: str, owner: Optional[Tuple[str, Optional[str]]]) -> AbortRequest:
        """`request_abort`, restricted to the runs of `owner` (agent name, scope or None) when
        given: a run of another agent or scope is reported exactly as a missing one
        (`storage.agent(...).abort` calls this)."""
        return self._aborts.request(run_id, owner)

    def _read_back(self, run_id: str, ours: Callable[[Dict[str, Any]], bool],
                   pending: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Optional[Applied]:
        """After a lost reply: Applied(1) when the run shows our write, None when the statement
        should run again (no run yet, or still `pending`), else Applied(0)."""
        run = self.get(run_id)
        if run is None:
            return None if pending is None else Applied(0)
        if ours(run):
            return Applied(1)
        return None if pending is not None and pending(run) else Applied(0)

    def abort_requested(self, run_id: str) -> bool:
        """True once an abort of `run_id` was requested: the check a worker makes between steps.

        One indexed read of one column. A run that does not exist reads as False, as in
        Better Agent's own abort check.
        """
        return self._aborts.requested(run_id)

    def abort_state(self, run_id: str) -> Tuple[bool, Optional[str]]:
        """(abort requested, status) of `run_id` in one indexed read: what a tracked run's
        `check_abort` asks; (False, None) when there is no such run."""
        return self._aborts.state(run_id)

    def heartbeat(self, run_id: str) -> bool:
        """Set the `updatedAt` of a running run to now: its worker is alive; False if it is not running.

        `reap_stale` fails runs whose `updatedAt` is older than its `stale_after`; a tracked run
        calls this by itself (see `track`'s `heartbeat_interval`). One conditional UPDATE.
        """
        if not storable_key(run_id):
            return False
        params = self._heartbeat.params({"now": self._encode_ts(now_ms()), "run": run_id})
        if self._executor.execute(self._heartbeat.sql, params, idempotent=True).rowcount == 1:
            return True
        # MySQL counts a row whose value did not change (two beats in one ms) as not updated.
        run = self.get(run_id)
        return run is not None and run["status"] == "running"

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

    def track(self, run_id: str, agent_name: str, *, thread_id: Optional[str] = None,
              scope: Optional[str] = None, config: Any = None,
              messages: Optional[Sequence[Mapping[str, Any]]] = None, state: Any = None,
              abort_check_interval: float = ABORT_CHECK_INTERVAL,
              heartbeat_interval: float = HEARTBEAT_INTERVAL,
              run_input: Optional[Mapping[str, Any]] = None) -> TrackedRun:
        """A run lived by a ``with`` block, written as Better Agent's own runtime writes it.

        ::

            with storage.runs.track(run_id, "support", thread_id=tid, messages=[question]) as run:
                for token in model.stream(...):
                    run.check_abort()                      # RunAborted once an abort is requested
                    run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": mid, "delta": token})
                run.append_messages([answer])

        Entering writes the `running` record (refused with ConflictError while a run of this
        id is running; a run that ended is started over), creates the thread or bumps its
        `updatedAt`, appends `messages`, opens the stream and emits RUN_STARTED. Leaving
        normally appends and stores RUN_FINISHED (status completed) and closes the stream;
        an exception stores RUN_ERROR (failed) and propagates; `RunAborted` stores RUN_ERROR
        with code ABORTED (aborted) and ends the block quietly; so does `RunEndedElsewhere`, which
        `check_abort` raises once someone else ended the run (`reap_stale`), writing nothing more.
        While it runs, the storage's heartbeat thread (and `emit`, `append_messages`,
        `check_abort`) set the run's `updatedAt` to now every `heartbeat_interval` seconds (10 by
        default), so followers and `reap_stale` leave a live run alone.
        `run_input`, when given, is RUN_STARTED's ``input`` (Better Agent's runtime writes the
        run's ``runId``, ``threadId``, ``messages``, ``tools`` and ``context`` there). See
        `better_agent_peewee.tracking.TrackedRun` and `better_agent_peewee.heartbeats`.

        `state` is the run's input state, kept in its thread as Better Agent keeps it: written on
        entry (without it the thread's state stays, and ``run.state`` reads it), then by
        ``run.set_state(state)`` and ``run.finish(result, state=...)``.
        """
        return TrackedRun(self, self._memory, self._streams, self._tables, run_id, agent_name,
                          thread_id=thread_id, scope=scope, config=config, messages=messages, state=state,
                          abort_check_interval=abort_check_interval, heartbeat_interval=heartbeat_interval,
                          run_input=run_input)

    def prune(self, older_than: datetime.timedelta, **options: Any) -> PruneReport:
        """Delete runs that finished more than `older_than` ago, with their streams and events.

        Options (statuses, batch_size, dry_run, ...) as `better_agent_peewee.prune.prune_runs`.
        """
        return prune_runs(self._tables, older_than, **options)

    def reap_stale(self, stale_after: datetime.timedelta, *, dry_run: bool = False) -> int:
        """Mark runs still `running` but not updated for `stale_after` as failed, closing their
        streams (what a crashed worker leaves behind); returns how many were marked (with
        `dry_run`: would be, writing nothing). See `better_agent_peewee.reap.reap_stale`."""
        return reap_stale(self._tables, stale_after, streams=self._streams, dry_run=dry_run)
