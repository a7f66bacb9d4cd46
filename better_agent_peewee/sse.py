"""Server-Sent Events for a run's stream, framework-free: any WSGI app can return it.

    from better_agent_peewee.sse import SSE_HEADERS, event_stream, resume_point

    # Flask
    @app.get("/runs/<run_id>/events")
    def events(run_id):
        after = resume_point(request.headers.get("Last-Event-ID"), request.args.get("after"))
        return Response(event_stream(storage, run_id, after), headers=SSE_HEADERS)

    # Django
    def events(request, run_id):
        after = resume_point(request.headers.get("Last-Event-ID"), request.GET.get("after"))
        return StreamingHttpResponse(event_stream(storage, run_id, after), headers=SSE_HEADERS)

Each stored event becomes one ``message`` whose ``id:`` is its seq, so a browser's
EventSource that reconnects sends ``Last-Event-ID`` and `resume_point` turns it into the
seq to resume after. While the stream is quiet a comment line goes out every `heartbeat`
seconds (proxies keep the connection). When the stream is closed and every event was sent
(or it was deleted) the response simply ends, as Better Agent's server ends it: its client
reads the end of the body as the end of the run. For a browser's EventSource, which
reconnects when a body ends, pass ``end_event=True``: an ``end`` event then comes last, with
``{"runId", "lastSeq", "reason"}`` (call ``source.close()`` on it); with `max_seconds` the
response ends after that long without ``end``, and the browser reconnects and resumes.
When the run's worker is presumed dead (the follower's reason "stale") an ``event: error``
frame with problem details (code ``STALE_RUN``) comes last (`stale_frame`), as Better
Agent's server ends a failed stream.

The response body holds no database connection: the storage's poller serves it.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Optional

from .followers import HEARTBEAT, Follower
from .reap import STALE_RUN_CODE

__all__ = ["SSE_HEADERS", "event_stream", "frames", "resume_point", "stale_frame"]

#: Headers of an SSE response (``X-Accel-Buffering: no`` stops nginx from buffering it).
SSE_HEADERS: Dict[str, str] = {"Content-Type": "text/event-stream; charset=utf-8",
                               "Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


def resume_point(last_event_id: Optional[str], after: Optional[str] = None) -> int:
    """The seq to resume after: the ``Last-Event-ID`` header if any, else `after` (e.g. ``?after=``), else 0.

    :raises ValueError: a value that is not a non-negative integer (e.g. an HTTP 400).
    """
    for name, value in (("Last-Event-ID", last_event_id), ("after", after)):
        if value is None or value == "":
            continue
        text = str(value).strip()
        if not text.isdigit() or not text.isascii() or len(text) > 18:
            raise ValueError(f"{name} must be a non-negative integer (an event seq), got {value!r:.40}")
        return int(text)
    return 0


def event_stream(storage: Any, run_id: str, after_seq: int = 0, *, heartbeat: float = 15.0,
                 max_seconds: Optional[float] = None, poll_interval: float = 0.025,
                 retry_ms: Optional[int] = None, end_event: bool = False) -> Iterator[str]:
    """The ``text/event-stream`` body following the stream of `run_id` after `after_seq`.

    By default the frames are those of Better Agent's server (``id:`` and ``data:`` per event,
    heartbeat comments, the body ending with the run). For EventSource pages: `end_event`
    sends an ``end`` event last, `retry_ms` a ``retry:`` hint first, and `max_seconds` ends a
    response after that long (the browser reconnects and resumes).
    Starts following at once, so a missing stream raises here, before any byte is sent.

    :raises NotFoundError: the stream does not exist (e.g. an HTTP 404).
    """
    follower = storage.streams.resume(run_id, after_seq, heartbeat=heartbeat, timeout=max_seconds,
                                      poll_interval=poll_interval)
    return frames(follower, retry_ms=retry_ms, end_event=end_event)


def stale_frame(follower: Follower) -> str:
    """The ``event: error`` frame (problem details, as Better Agent's server sends on a failure)
    that ends the body when the run's worker is presumed dead: read as a failure, not a finish."""
    problem = {"type": "about:blank", "title": "Run worker presumed dead", "status": 503,
               "detail": f"run {follower.run_id!r} still says running but its worker sent no heartbeat "
                         f"for its stale limit; it may be reaped as failed (STALE_RUN)",
               "code": STALE_RUN_CODE, "context": {"runId": follower.run_id, "lastSeq": follower.last_seq}}
    return f"event: error\ndata: {json.dumps(problem, ensure_ascii=False, separators=(',', ':'))}\n\n"


def frames(follower: Follower, *, retry_ms: Optional[int] = None, end_event: bool = False) -> Iterator[str]:
    """SSE frames of a `resume` follower: events and heartbeat comments; with `end_event`, an
    ``end`` event once the stream is closed or deleted."""
    try:
        if retry_ms is not None:
            yield f"retry: {int(retry_ms)}\n\n"  # how long the browser waits before reconnecting
        for item in follower:
            if item is HEARTBEAT:
                yield ": heartbeat\n\n"
                continue
            yield (f"id: {item['seq']}\n"
                   f"data: {json.dumps(item, ensure_ascii=False, separators=(',', ':'))}\n\n")
        if end_event and follower.reason in ("closed", "deleted"):
            end = {"runId": follower.run_id, "lastSeq": follower.last_seq, "reason": follower.reason}
            yield f"event: end\ndata: {json.dumps(end, ensure_ascii=False, separators=(',', ':'))}\n\n"
        elif follower.reason == "stale":
            yield stale_frame(follower)
    finally:
        follower.close()  # the client went away (the server closed this generator): stop following
