"""``POST /:name/run``: a run of an agent written in Python, tracked, streamed or answered as JSON."""
from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..tracking import TrackedRun
from .auth import Access
from .control import Control
from .problems import Problem, problem_of
from .resume import check_resume, run_config
from .routes import open_interrupts
from .wire import Reply, Request, json_reply, release_connection

logger = logging.getLogger(__name__)

__all__ = ["RunRequest", "Runner"]

#: Fields a stored message has from where it is stored, not from the message itself.
_PLACEMENT = ("threadId", "runId", "createdAt")


@dataclass(frozen=True)
class RunRequest:
    """What an agent is asked to do: the second argument of ``agent(run, request)``.

    ``messages`` is the thread's history followed by the new input messages (with the ids the
    server gave them), as Better Agent hands them to its model; ``body`` is the request body
    as sent (for fields of your own); ``resume`` answers the interrupts of the previous run.
    """

    agent_name: str
    run_id: str
    thread_id: Optional[str]
    messages: List[Dict[str, Any]]
    state: Any = None
    context: Any = None
    resume: Optional[List[Any]] = None
    auth: Optional[Dict[str, Any]] = None
    body: Dict[str, Any] = field(default_factory=dict)


class Runner:
    """Starts runs of Python agents and answers them as SSE or as JSON."""

    def __init__(self, storage: Any, access: Access, control: Control, abort_on_disconnect: bool,
                 executor: Optional[Executor]) -> None:
        self.storage = storage
        self.access = access
        self.control = control
        self.abort_on_disconnect = bool(abort_on_disconnect)
        self.executor = executor
        self.has_streams = "streams" in getattr(storage, "domains", ("streams",))

    def run(self, request: Request, params: Dict[str, str]) -> Reply:
        """POST /:name/run: start the run, then stream it (``Accept: text/event-stream``) or
        execute it in this thread and answer its result as JSON."""
        body = request.json_body()
        streamed = request.wants_event_stream()
        name = params["name"]
        auth = self.access.resolve(request.environ)
        agent = self.access.agent(name)
        self.access.check_agent(name, auth, request.environ)
        run_body: Dict[str, Any] = body if isinstance(body, dict) else {}
        if "threadId" in run_body and not isinstance(run_body["threadId"], str):
            raise Problem("VALIDATION_FAILED", "Run threadId must be a string when provided.")
        thread_id: Optional[str] = run_body.get("threadId")
        thread, scope = None, None
        if thread_id is not None and self.access.has_memory:  # (without memory: no thread, no scope)
            scope = self.access.memory_scope(name, auth, request.environ)
            thread = self.storage.memory.threads.get(thread_id)
            if thread is not None:
                Access.visible_thread(thread, thread_id, name, scope)
        if agent is None:
            raise Problem("NOT_FOUND", f"Agent '{name}' is not run by this server: its runs start elsewhere.",
                          context={"agentName": name})
        if streamed and not self.has_streams:
            raise Problem("VALIDATION_FAILED", "Stream storage is not configured: this server streams a run "
                          "from its stored stream. Ask for the JSON result instead.")
        run, run_request = self._start(name, run_body, thread, thread_id, scope, auth)
        if streamed:
            self._submit(agent, run, run_request)
            return self.control.sse(run.run_id, 0, live=True, on_close=self._on_close(run.run_id))
        return self._answer(agent, run, run_request)

    def _start(self, name: str, body: Dict[str, Any], thread: Optional[Dict[str, Any]],
               thread_id: Optional[str], scope: Optional[str],
               auth: Optional[Dict[str, Any]]) -> tuple[TrackedRun, RunRequest]:
        """Check the input, then write the run's start (thread, input messages, RUN_STARTED)."""
        messages = _input_messages(body.get("messages"))
        latest = self.storage.runs.latest_for_thread(thread_id) if thread_id is not None else None
        resume = check_resume(body, thread_id, latest, messages)
        run_id = f"run_{uuid.uuid4()}"
        for message in messages:
            message["id"] = f"message_{uuid.uuid4()}"  # as Better Agent: the server names them
        history = [] if thread is None else [
            {k: v for k, v in m.items() if k not in _PLACEMENT}
            for m in self.storage.memory.messages.list(thread_id)]
        state = body.get("state")
        if state is None and thread is not None:
            state = thread.get("state")
        agent = self.access.agent(name)
        run_input: Dict[str, Any] = {"runId": run_id, "threadId": thread_id or "",
                                     "messages": history + messages,
                                     "tools": list(getattr(agent, "tools", None) or []), "context": []}
        if resume is not None:
            run_input["resume"] = resume
        if state is not None:
            run_input["state"] = state
        run = self.storage.runs.track(run_id, name, thread_id=thread_id, scope=scope,
                                      config=run_config(body, latest, resume),
                                      messages=messages if thread_id is not None else None,
                                      state=body.get("state"), run_input=run_input)
        run.start()
        return run, RunRequest(agent_name=name, run_id=run_id, thread_id=thread_id,
                               messages=history + messages, state=run.state, context=body.get("context"),
                               resume=resume, auth=auth, body=body)

    def _submit(self, agent: Any, run: TrackedRun, run_request: RunRequest) -> None:
        """Execute the run in the executor, or in a thread of its own.

        When neither takes it (an executor shut down, no thread to be had), the run is
        recorded as failed and the error answered.
        """
        try:
            if self.executor is not None:
                self.executor.submit(self._execute_quietly, agent, run, run_request)
            else:
                threading.Thread(target=self._execute_quietly, args=(agent, run, run_request),
                                 name=f"agent-{run.run_id}", daemon=True).start()
        except Exception as exc:
            with contextlib.suppress(Exception), run:
                raise exc  # (recorded as RUN_ERROR: the run does not stay `running`)
            raise

    def _execute_quietly(self, agent: Any, run: TrackedRun, run_request: RunRequest) -> None:
        try:
            execute(agent, run, run_request)
        except Exception:
            logger.exception("run %s failed", run.run_id)  # recorded on the run as RUN_ERROR
        finally:
            release_connection(self.storage)  # a pooled connection goes back: an idle worker holds none

    def _on_close(self, run_id: str) -> Any:
        def closed(ended: bool) -> None:
            if ended or not self.abort_on_disconnect:
                return
            try:  # the client went away mid-run: stop the run, as Better Agent does
                self.storage.runs.request_abort(run_id)
            except Exception:
                logger.warning("could not abort run %s after its client went away", run_id, exc_info=True)
        return closed

    def _answer(self, agent: Any, run: TrackedRun, run_request: RunRequest) -> Reply:
        """Execute the run here and answer ``{runId, threadId, messages, outcome, ...result}``."""
        try:
            result = execute(agent, run, run_request)
        except Exception as exc:
            raise problem_of(exc) from exc
        if run.status not in ("completed", "interrupted"):  # aborted, or ended by someone else
            final = run.final_event or (self.storage.runs.get(run.run_id) or {}).get("finalEvent") or {}
            code = final.get("code") or ("ABORTED" if run.status == "aborted" else "CONFLICT")
            raise Problem(str(code), final.get("message") or f"Run '{run.run_id}' was ended elsewhere.")
        answer: Dict[str, Any] = {"runId": run.run_id}
        if run.thread_id is not None:
            answer["threadId"] = run.thread_id
        # The messages the run added (not its input), as the model wrote them.
        answer["messages"] = [{k: v for k, v in m.items() if k not in _PLACEMENT} for m in run.messages]
        if run.state is not None:  # the state the run left (set_state, finish), as Better Agent's result
            answer["state"] = run.state
        if run.status == "interrupted":
            answer.update(outcome="interrupt", interrupts=open_interrupts(
                {"status": "interrupted", "finalEvent": run.final_event}))
        else:
            answer["outcome"] = "success"
            answer.update(result or {})
        return json_reply(answer)

def execute(agent: Any, run: TrackedRun, run_request: RunRequest) -> Optional[Mapping[str, Any]]:
    """``agent(run, request)`` inside ``with run:``; its result ends the run as RUN_FINISHED.result.

    An exception fails the run (and propagates); `RunAborted` aborts it (quietly).
    """
    result: Optional[Mapping[str, Any]] = None
    with run:
        result = agent(run, run_request)
        if result is not None and not isinstance(result, Mapping):
            raise TypeError(f"agent {run.agent_name!r} returned {type(result).__name__}; "
                            "an agent returns None or its result dict (finishReason, usage, stepCount)")
        if run.status == "running":  # (the agent may have finished it itself, e.g. with interrupts)
            run.finish(dict(result) if result else None)
    return result


def _input_messages(messages: Any) -> List[Dict[str, Any]]:
    """The body's ``messages``: a list of message objects (copied), or a 422 problem."""
    if messages is None:
        return []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise Problem("VALIDATION_FAILED", "Run messages must be a list of message objects.")
    return [dict(m) for m in messages]
