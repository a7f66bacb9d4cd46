"""The five record shapes as `TypedDict`s, for type checkers and editors.

Records are plain dicts at run time; these classes only describe them ("Records" in
docs/contract.md).
Keys are Better Agent's field names (camelCase), timestamps are epoch milliseconds (UTC).
An optional field is absent when it has no value: it is never present as ``None``, except
``config`` on a run, which is always present and may be ``None``.

Each record is written as a base class of the required fields and a ``total=False``
subclass adding the optional ones, which works on Python 3.9 (no ``NotRequired``)::

    from better_agent_peewee import ThreadRecord

    thread: ThreadRecord = {"id": "t1", "agentName": "support", "createdAt": now, "updatedAt": now}
    storage.memory.threads.set("t1", thread)
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, TypedDict

__all__ = [
    "RunStatus",
    "StreamStatus",
    "ThreadRecord",
    "MessageRecord",
    "RunRecord",
    "StreamRecord",
    "StreamEventRecord",
    "ListResult",
]

#: What `status` of a run may be. `running` until the run ends.
RunStatus = Literal["running", "completed", "failed", "interrupted", "aborted"]
#: What `status` of a stream may be.
StreamStatus = Literal["open", "closed"]


class _ThreadRequired(TypedDict):
    id: str
    agentName: str
    createdAt: int
    updatedAt: int


class ThreadRecord(_ThreadRequired, total=False):
    """A conversation thread (`memoryThreads`, table ``threads``)."""

    scope: str
    title: str
    #: Any JSON value (object, array, string, number, boolean or null).
    state: Any
    #: A JSON object.
    metadata: Dict[str, Any]


class _MessageRequired(TypedDict):
    id: str
    role: str
    threadId: str
    createdAt: int


class MessageRecord(_MessageRequired, total=False):
    """A message of a thread (`memoryMessages`, table ``messages``): an AG-UI message plus
    where it is stored (`threadId`, `runId`, `createdAt`).

    Any other key of the AG-UI message (``name``, ``toolCallId``, ...) is stored and read
    back as well; a TypedDict cannot list keys it does not know, so type checkers need a
    cast for those. The storage id of a message is ``f"{threadId}:{createdAt}:{id}"``.
    """

    content: Any
    runId: str
    toolCalls: List[Dict[str, Any]]


class _RunRequired(TypedDict):
    runId: str
    agentName: str
    status: RunStatus
    #: Always present; None when the run has no configuration.
    config: Any
    startedAt: int
    updatedAt: int


class RunRecord(_RunRequired, total=False):
    """A run of an agent (`runs`, table ``agent_runs``)."""

    threadId: str
    scope: str
    abortRequestedAt: int
    #: The AG-UI event that ended the run: ``{"type": "RUN_FINISHED", ...}`` or
    #: ``{"type": "RUN_ERROR", "message": ..., "code"?: ...}``.
    finalEvent: Dict[str, Any]
    finishedAt: int


class _StreamRequired(TypedDict):
    runId: str
    status: StreamStatus
    createdAt: int
    updatedAt: int


class StreamRecord(_StreamRequired, total=False):
    """The event stream of a run (`streams`, table ``streams``; its id is the run id).

    `id` may be given when writing (it must equal `runId`); reading returns `runId` only.
    """

    id: str
    closedAt: int


class StreamEventRecord(TypedDict):
    """One event of a stream (`streamEvents`, table ``stream_events``).

    `id` is ``f"{runId}:{seq}"``; `seq` counts 1, 2, 3 ... per run; `event` is the AG-UI
    event object. (`storage.streams.resume` yields the event object itself, plus `seq`.)
    """

    id: str
    runId: str
    seq: int
    timestamp: int
    event: Dict[str, Any]


class ListResult(TypedDict):
    """What `storage.list` returns."""

    items: List[Dict[str, Any]]
