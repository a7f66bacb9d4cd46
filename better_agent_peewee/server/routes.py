"""The thread routes: threads of an agent, their messages, and the runtime of the latest run."""
from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Tuple

from ..records import now_ms
from .auth import Access
from .problems import Problem
from .wire import Reply, Request, js_number, json_reply, no_content

__all__ = ["Threads", "thread_view", "limit_of"]

#: The thread fields a route answers with (the scope stays on the server).
_THREAD_FIELDS = ("id", "agentName", "title", "state", "metadata", "createdAt", "updatedAt")
#: The largest limit handed to SQL (a larger one means "all" anyway).
_MAX_LIMIT = 2 ** 31 - 1


def thread_view(thread: Dict[str, Any]) -> Dict[str, Any]:
    """The thread as the routes answer it: its fields without the scope."""
    return {key: thread[key] for key in _THREAD_FIELDS if key in thread}


def limit_of(text: Optional[str]) -> Optional[int]:
    """``?limit=``: a positive number (its integer part), else None (no limit), as Better Agent reads it."""
    if text is None:
        return None
    value = js_number(text)
    if value is None or not value > 0:
        return None
    return min(int(value), _MAX_LIMIT)


class Threads:
    """``/:name/threads...``: list, create, get, update, delete, messages, runtime."""

    def __init__(self, storage: Any, access: Access) -> None:
        self.storage = storage
        self.access = access

    def _scoped(self, request: Request, name: str) -> Tuple[Any, str]:
        """The agent checked, and the caller's scope for its memory (Better Agent's getThreadRequest)."""
        self.access.agent(name)
        if not self.access.has_memory:
            raise Problem("NOT_FOUND", f"Agent '{name}' does not have memory configured.")
        auth = self.access.resolve(request.environ)
        self.access.check_agent(name, auth, request.environ)
        return auth, self.access.memory_scope(name, auth, request.environ)

    def _visible(self, request: Request, params: Dict[str, str]) -> Dict[str, Any]:
        """The route's thread, checked to be the agent's and in the caller's scope (else 404)."""
        name, thread_id = params["name"], params["threadId"]
        _, scope = self._scoped(request, name)
        return Access.visible_thread(self.storage.memory.threads.get(thread_id), thread_id, name, scope)

    def list(self, request: Request, params: Dict[str, str]) -> Reply:
        """GET /:name/threads?limit=N: the caller's threads of the agent, latest update first."""
        name = params["name"]
        _, scope = self._scoped(request, name)
        limit = limit_of(request.param("limit"))
        threads = self.storage.memory.threads.list(agent_name=name, scope=scope, limit=limit)
        return json_reply({"threads": [thread_view(t) for t in threads]})

    def create(self, request: Request, params: Dict[str, str]) -> Reply:
        """POST /:name/threads {title?, metadata?}: a new thread in the caller's scope (201)."""
        body = request.json_body()
        name = params["name"]
        _, scope = self._scoped(request, name)
        now = now_ms()
        thread: Dict[str, Any] = {"id": f"thread_{uuid.uuid4()}", "agentName": name, "scope": scope}
        thread.update(_edits(body))
        thread.update(createdAt=now, updatedAt=now)
        self.storage.memory.threads.set(thread["id"], thread)
        return json_reply(thread_view(thread), 201)

    def get(self, request: Request, params: Dict[str, str]) -> Reply:
        """GET /:name/threads/:threadId."""
        return json_reply(thread_view(self._visible(request, params)))

    def update(self, request: Request, params: Dict[str, str]) -> Reply:
        """PATCH /:name/threads/:threadId {title?, metadata?}: the thread as updated."""
        body = request.json_body()
        name, thread_id = params["name"], params["threadId"]
        _, scope = self._scoped(request, name)
        threads, now = self.storage.memory.threads, now_ms()
        # The row locked first (`touch`: one UPDATE), then read and replaced in the same transaction:
        # a state a run wrote meanwhile is kept, and a thread deleted meanwhile is not made again.
        with self.storage.transaction():
            threads.touch(thread_id, now)
            current = Access.visible_thread(threads.get(thread_id), thread_id, name, scope)
            updated = {**current, **_edits(body), "updatedAt": now}
            threads.set(thread_id, updated)
        return json_reply(thread_view(updated))

    def delete(self, request: Request, params: Dict[str, str]) -> Reply:
        """DELETE /:name/threads/:threadId: 204; ``{}`` (200) for a thread that does not exist."""
        name, thread_id = params["name"], params["threadId"]
        _, scope = self._scoped(request, name)
        thread = self.storage.memory.threads.get(thread_id)
        if thread is None:
            return json_reply({})
        Access.visible_thread(thread, thread_id, name, scope)
        self.storage.memory.threads.delete(thread_id)
        return no_content()

    def messages(self, request: Request, params: Dict[str, str]) -> Reply:
        """GET /:name/threads/:threadId/messages?limit=N&beforeRunId=R: ``{"messages": [...]}``."""
        self._visible(request, params)
        before = request.param("beforeRunId") or None
        messages: List[Dict[str, Any]] = self.storage.memory.messages.list(
            params["threadId"], limit=limit_of(request.param("limit")) or None,  # (0 < limit < 1: all)
            before_run_id=before)
        return json_reply({"messages": messages})

    def runtime(self, request: Request, params: Dict[str, str]) -> Reply:
        """GET /:name/threads/:threadId/runtime: the latest run, when it can be resumed or answered.

        ``{"resumable": {"runId", "afterSequence": 0}}`` while it runs with an open stream,
        ``{"interrupted": {"runId", "interrupts"}}`` when it waits for input, else ``{}``.
        """
        self._visible(request, params)
        latest = self.storage.runs.latest_for_thread(params["threadId"])
        if latest is None or latest.get("agentName") != params["name"]:
            return json_reply({})
        if latest["status"] == "interrupted":
            interrupts = open_interrupts(latest)
            return json_reply({"interrupted": {"runId": latest["runId"], "interrupts": interrupts}}
                              if interrupts else {})
        if latest["status"] != "running":
            return json_reply({})
        stream = self.storage.streams.get(latest["runId"])
        if stream is None or stream.get("status") != "open":
            return json_reply({})
        return json_reply({"resumable": {"runId": latest["runId"], "afterSequence": 0}})


def open_interrupts(run: Optional[Dict[str, Any]]) -> List[Any]:
    """The interrupts an interrupted run waits on (none for any other run)."""
    if run is None or run.get("status") != "interrupted":
        return []
    final = run.get("finalEvent") or {}
    if final.get("type") != "RUN_FINISHED" or final.get("outcome") != "interrupt":
        return []
    interrupts = final.get("interrupts")
    return list(interrupts) if isinstance(interrupts, list) else []


def _edits(body: Any) -> Dict[str, Any]:
    """What a create or update body may set: a string ``title``, an object ``metadata``."""
    edits: Dict[str, Any] = {}
    if isinstance(body, dict):
        if isinstance(body.get("title"), str):
            edits["title"] = body["title"]
        if isinstance(body.get("metadata"), dict):
            edits["metadata"] = body["metadata"]
    return edits
