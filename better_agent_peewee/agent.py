"""Agent-scoped run control: `storage.agent(name, scope=None)`, as Better Agent's ``app.agent(name)``.

`abort` and `resume` act on the latest running run of the agent (in the scope, when one is
given) when no run id is passed, as Better Agent's ``resolvedAgentRunId`` does; a run id of
another agent, or of another scope, is answered exactly as a missing run, as its handler's
``requireRunBelongsToAgent`` does, so a caller learns nothing of runs that are not theirs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .errors import NotFoundError
from .followers import Follower
from .records import check_key, storable_key
from .runs import AbortRequest, Runs, owned_by
from .streams import Streams

__all__ = ["AgentHandle"]

_RUNS = "runs"


class AgentHandle:
    """The runs of one agent, in one scope or all: what `storage.agent(name, scope)` returns."""

    def __init__(self, runs: Runs, streams: Streams, name: str, scope: Optional[str] = None) -> None:
        """:param name: the agent's name, as its runs record it (``agentName``).
        :param scope: only runs in this scope (and, given a run id, runs without a scope);
            None: runs in any scope."""
        self.name: str = check_key(_RUNS, "agentName", name)
        self.scope: Optional[str] = None if scope is None else check_key(_RUNS, "scope", scope)
        self._runs = runs
        self._streams = streams

    def __repr__(self) -> str:
        return f"<AgentHandle {self.name!r}{'' if self.scope is None else f' scope {self.scope!r}'}>"

    def running(self) -> Optional[Dict[str, Any]]:
        """The running run of this agent (in the scope) that started last, or None."""
        return self._runs.running(self.name, self.scope)

    def abort(self, run_id: Optional[str] = None) -> AbortRequest:
        """Ask the worker of `run_id` (default: the latest running run) to stop; what happened,
        as `storage.runs.request_abort` says it.

        A run that ends between the lookup and the request answers `AbortRequest.NOT_RUNNING`.

        :raises NotFoundError: no running run of this agent (without `run_id`), or no run
            `run_id` of this agent in this scope.
        """
        if run_id is None:
            run_id = self._latest("abort")
        # The owner is checked by the UPDATE itself: a run id taken over meanwhile is not stamped.
        return self._runs.abort_of(run_id, (self.name, self.scope))

    def resume(self, run_id: Optional[str] = None, after_seq: int = 0, **options: Any) -> Follower:
        """Follow the stream of `run_id` (default: the latest running run) after `after_seq`:
        a `Follower`, as `storage.streams.resume(run_id, after_seq, **options)` returns.

        :raises NotFoundError: no running run of this agent (without `run_id`), no run
            `run_id` of this agent in this scope, or the run has no stream.
        """
        if run_id is None:
            run_id = self._latest("resume")
        else:
            run = self._runs.get(run_id) if storable_key(run_id) else None
            if run is None or not owned_by(run, self.name, self.scope):
                raise NotFoundError(_RUNS, run_id, f"runs: cannot resume run {run_id!r}: it does not exist")
        return self._streams.resume(run_id, after_seq, **options)

    def _latest(self, action: str) -> str:
        run = self.running()
        if run is None:
            where = "" if self.scope is None else f" in scope {self.scope!r}"
            raise NotFoundError(_RUNS, None, f"runs: no running run of agent {self.name!r}{where} "
                                             f"to {action}; pass a run id")
        run_id: str = run["runId"]
        return run_id
