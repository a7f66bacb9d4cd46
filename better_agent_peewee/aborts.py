"""A run's abort request: stamped once on a running run, read by its worker ("Runs" in docs/contract.md).

Aborting is a request: it stamps `abortRequestedAt` on a running run, and the worker executing
the run notices (`Runs.abort_requested`, a tracked run's `check_abort`) between steps and stops.
The stamp is one conditional UPDATE, so of callers racing exactly one is told it asked.
`storage.runs` answers its abort calls with an `Aborts`.
"""
from __future__ import annotations

import enum
import logging
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import NotFoundError
from .executor import Applied
from .query import Statement, compile_statement, first_row, marker
from .records import check_key, now_ms, storable_key
from .tables import Tables

logger = logging.getLogger(__name__)

__all__ = ["Aborts", "AbortRequest", "owned_by"]

_RUNS = "runs"


class AbortRequest(str, enum.Enum):
    """What `request_abort` did. Only REQUESTED is true, so ``if runs.request_abort(id):``
    reads "this call asked the worker to stop"; the value is a string (JSON-friendly)."""

    #: This call stamped the abort: the worker stops at its next check.
    REQUESTED = "requested"
    #: The run is running and was already asked to stop (by an earlier call).
    ALREADY_REQUESTED = "already_requested"
    #: The run has ended (completed, failed, interrupted or aborted): nothing to stop.
    NOT_RUNNING = "not_running"

    def __bool__(self) -> bool:
        return self is AbortRequest.REQUESTED


def owned_by(run: Mapping[str, Any], agent_name: str, scope: Optional[str]) -> bool:
    """True if `run` is a run of `agent_name` that a caller in `scope` may act on: any scope when
    `scope` is None, else that scope or none (Better Agent's handler lets any caller act on a run
    without a scope)."""
    return run.get("agentName") == agent_name and (scope is None or run.get("scope") in (None, scope))


class Aborts:
    """The abort stamp of the runs: requested once, read in one indexed read."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._table = tables.table(_RUNS)
        self._encode_ts = tables.executor.dialect.encode_ts
        self._decode_ts = tables.executor.dialect.decode_ts
        db, R = tables.executor.database, tables.models.run
        # Only a running run that was not asked yet: the WHERE clause decides who wins a race.
        stamp = R.update({R.abort_requested_at: marker("now"), R.updated_at: marker("now")})
        can_abort = (R.run_id == marker("run")) & (R.status == "running") & R.abort_requested_at.is_null()
        self._abort = compile_statement(db, stamp.where(can_abort))
        # The same for `storage.agent(...)`: only a run of that agent (and, with a scope, in that
        # scope or in none, as Better Agent's run access check), decided by the same statement.
        of_agent = can_abort & (R.agent_name == marker("agent"))
        self._abort_of: Dict[bool, Statement] = {
            False: compile_statement(db, stamp.where(of_agent)),
            True: compile_statement(db, stamp.where(
                of_agent & ((R.scope == marker("scope")) | R.scope.is_null())))}
        self._stamp = compile_statement(db, R.select(R.abort_requested_at).where(R.run_id == marker("run")))
        self._state = compile_statement(
            db, R.select(R.abort_requested_at, R.status).where(R.run_id == marker("run")))

    def request(self, run_id: str, owner: Optional[Tuple[str, Optional[str]]]) -> AbortRequest:
        """Stamp the abort of running `run_id` (of `owner`, agent name and scope or None, when
        given), and say what happened; a run of another owner is reported as a missing one.

        :raises NotFoundError: there is no run `run_id` (of `owner`).
        """
        run_id = check_key(_RUNS, "runId", run_id)
        stamp = now_ms()
        values = {"now": self._encode_ts(stamp), "run": run_id}
        statement = self._abort
        if owner is not None:
            values["agent"], values["scope"] = owner
            statement = self._abort_of[owner[1] is not None]
        # Not idempotent: a second run after a lost reply would answer False to the winner. So
        # after a lost reply the stamp is read back: ours means this call made the request.
        if self._executor.execute(statement.sql, statement.params(values), idempotent=False,
                                  resolve=lambda: self.read_back(run_id, stamp)).rowcount == 1:
            logger.debug("abort requested for run %r", run_id)
            return AbortRequest.REQUESTED
        run = self._table.get(run_id)
        if run is None or (owner is not None and not owned_by(run, *owner)):
            raise NotFoundError(_RUNS, run_id, f"runs: cannot abort run {run_id!r}: it does not exist")
        if run["status"] == "running":
            return AbortRequest.ALREADY_REQUESTED
        return AbortRequest.NOT_RUNNING

    def read_back(self, run_id: str, stamp: int) -> Optional[Applied]:
        """After a lost reply to the stamp: Applied(1) when the run holds `stamp` (this call
        stamped it), Applied(0) when another stamp is there, None when none is (run it again)."""
        params = self._stamp.params({"run": run_id})
        row = first_row(self._executor.execute(self._stamp.sql, params, idempotent=True))
        if row is None or row[0] is None:
            return None  # not stamped (or no such run): the UPDATE can run again
        return Applied(1 if self._decode_ts(row[0]) == stamp else 0)

    def requested(self, run_id: str) -> bool:
        """True once an abort of `run_id` was requested; False for a run that does not exist."""
        if not storable_key(run_id):
            return False
        row = first_row(self._executor.execute(self._stamp.sql, self._stamp.params({"run": run_id}),
                                               idempotent=True))
        return row is not None and row[0] is not None

    def state(self, run_id: str) -> Tuple[bool, Optional[str]]:
        """(abort requested, status) of `run_id` in one indexed read; (False, None) for no such run."""
        if not storable_key(run_id):
            return False, None
        row = first_row(self._executor.execute(self._state.sql, self._state.params({"run": run_id}),
                                               idempotent=True))
        if row is None:
            return False, None
        return row[0] is not None, str(row[1])
