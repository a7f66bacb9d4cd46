"""Run control: abort a run and follow its stream as Server-Sent Events, by run id or by agent."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Optional

from ..errors import DomainNotConfiguredError, NotFoundError
from ..followers import HEARTBEAT, Follower
from ..reap import STALE_RUN_CODE
from .auth import Access, run_not_found
from .problems import Problem, problem_of
from .wire import (
    HEARTBEAT_FRAME,
    SSE_HEADERS,
    Reply,
    Request,
    error_frame,
    event_frame,
    js_number,
    no_content,
    release_connection,
)

logger = logging.getLogger(__name__)

__all__ = ["Control", "after_seq"]


def after_seq(last_event_id: Optional[str]) -> int:
    """The seq to resume after, from ``Last-Event-ID`` read as Better Agent's server reads it.

    ``Number(header)``: a missing, empty or unreadable value starts from the beginning (it is
    not an error there), a fraction resumes after its integer part, a negative one from the start.
    """
    value = js_number(last_event_id)
    if value is None or value < 0:
        return 0
    return min(int(value), 2 ** 62)


def stream_not_found(run_id: str) -> Problem:
    """The problem of a run whose stream does not exist."""
    return Problem("NOT_FOUND", f"Stream with runId '{run_id}' not found.", context={"runId": run_id})


class Control:
    """``POST /runs/:runId/abort``, ``GET /runs/:runId/stream`` and their ``/:name/...`` forms."""

    def __init__(self, storage: Any, access: Access, heartbeat: float) -> None:
        self.storage = storage
        self.access = access
        self.heartbeat = float(heartbeat)

    def _agent_run_id(self, request: Request, name: str, action: str) -> str:
        """``?runId=``, or the agent's latest running run in the caller's scope; checked to be the
        agent's and visible to the caller (Better Agent's resolvedAgentRunId and run checks)."""
        run_id = request.param("runId") or None
        self.access.agent(name)
        auth = self.access.resolve(request.environ)
        self.access.check_agent(name, auth, request.environ)
        if run_id is None:
            scope = self.access.lookup_scope(name, auth, request.environ)
            running = self.storage.agent(name, scope).running()
            if running is None:
                raise Problem("VALIDATION_FAILED", f"Please provide runid or run storage to {action}.")
            run_id = running["runId"]
        record = self.storage.runs.get(run_id)
        self.access.check_run(record, run_id, auth, request.environ)
        if record is None or record.get("agentName") != name:
            raise run_not_found(run_id, agentName=name)
        return str(run_id)

    def _checked_run_id(self, request: Request, run_id: str) -> Optional[Dict[str, Any]]:
        """The run `run_id` (or None), checked to be visible to the caller."""
        auth = self.access.resolve(request.environ)
        record: Optional[Dict[str, Any]] = self.storage.runs.get(run_id)
        self.access.check_run(record, run_id, auth, request.environ)
        return record

    def abort_agent_run(self, request: Request, params: Dict[str, str]) -> Reply:
        """POST /:name/abort?runId=R: ask the run (default: the agent's running one) to stop; 204."""
        name = params["name"]
        run_id = self._agent_run_id(request, name, "abort request")
        try:  # (the agent is checked again by the abort's UPDATE: a run taken over meanwhile is not)
            self.storage.agent(name).abort(run_id)
        except NotFoundError:
            raise run_not_found(run_id, agentName=name) from None
        return no_content()

    def abort_run(self, request: Request, params: Dict[str, str]) -> Reply:
        """POST /runs/:runId/abort: ask the run to stop; 204 (also when it has ended), 404 if unknown."""
        run_id = params["runId"]
        if self._checked_run_id(request, run_id) is None:
            raise run_not_found(run_id)
        try:
            self.storage.runs.request_abort(run_id)
        except NotFoundError:  # gone between the check and the request
            raise run_not_found(run_id) from None
        return no_content()

    def stream_agent_run(self, request: Request, params: Dict[str, str]) -> Reply:
        """GET /:name/stream?runId=R: the run's events after ``Last-Event-ID``, as SSE."""
        name = params["name"]
        run_id = self._agent_run_id(request, name, "resume stream")
        return self.sse(run_id, after_seq(request.header("Last-Event-ID")), agent=name)

    def stream_run(self, request: Request, params: Dict[str, str]) -> Reply:
        """GET /runs/:runId/stream: the run's events after ``Last-Event-ID``, as SSE."""
        run_id = params["runId"]
        self._checked_run_id(request, run_id)
        return self.sse(run_id, after_seq(request.header("Last-Event-ID")))

    def sse(self, run_id: str, after: int, *, live: bool = False, agent: Optional[str] = None,
            on_close: Optional[Callable[[bool], None]] = None) -> Reply:
        """The SSE response following the stream of `run_id` after `after`.

        Replayed frames carry ``id: <seq>`` and the event's ``seq``; `live` frames (a run
        answered as it happens) carry neither, as Better Agent's server sends them.
        ``on_close(ended)`` runs when the body is closed: `ended` is False when the client went
        away before the stream ended. With `agent`, the run is followed as that agent's.
        """
        try:
            if agent is None:
                follower = self.storage.streams.resume(run_id, after, heartbeat=self.heartbeat)
            else:
                follower = self.storage.agent(agent).resume(run_id, after, heartbeat=self.heartbeat)
        except (NotFoundError, DomainNotConfiguredError) as exc:
            problem = stream_not_found(run_id) if isinstance(exc, NotFoundError) else Problem(
                "VALIDATION_FAILED",
                "Stream storage is not configured. resumeStream() requires a StreamStore.")
            body: Iterator[bytes] = iter([b"", error_frame(problem)])
            if on_close is not None:
                on_close(True)
        else:
            body = self._frames(follower, live, on_close)
        return Reply(200, [*SSE_HEADERS, ("X-Run-Id", run_id)], body)

    def _frames(self, follower: Follower, live: bool,
                on_close: Optional[Callable[[bool], None]]) -> Iterator[bytes]:
        ended = False
        try:
            yield b""  # the headers go out now, as the TypeScript server sends them at once
            for item in follower:
                if item is HEARTBEAT:
                    yield HEARTBEAT_FRAME
                    continue
                if live:
                    del item["seq"]
                yield event_frame(item, with_id=not live)
            ended = True
            if follower.reason == "stale":
                yield error_frame(Problem(
                    STALE_RUN_CODE, f"Run '{follower.run_id}' still says running but its worker sent no "
                    "heartbeat for its stale limit; it may be reaped as failed.",
                    context={"runId": follower.run_id, "lastSeq": follower.last_seq}))
        except Exception as exc:  # the stream cannot be read (the database is gone): say so, then end
            ended = True
            yield error_frame(problem_of(exc))
        finally:
            follower.close()
            if on_close is not None:
                on_close(ended)
            self._release()

    def _release(self) -> None:
        release_connection(self.storage)
