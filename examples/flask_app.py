"""A synchronous web app over the storage: threads, their messages, and live run streams (SSE).

    pip install flask
    python examples/quickstart.py                       # some data to look at (./agent.db)
    flask --app examples/flask_app run                  # http://127.0.0.1:5000/threads
    DATABASE_URL=postgresql://app:secret@localhost/app flask --app examples/flask_app run

Routes:

    GET  /threads?agent=NAME&limit=N      threads, most recently updated first
    GET  /threads/<thread_id>?limit=N     the thread and its messages (the last N)
    POST /threads/<thread_id>/runs        {"message": "..."}: a run of the demo agent -> 202 {"runId"}
    GET  /runs/<run_id>                   the run record
    POST /runs/<run_id>/abort             ask the worker running it to stop: {"requested": bool, "abort":
                                          "requested" | "already_requested" | "not_running"}
    GET  /runs/<run_id>/events            Server-Sent Events: the run's stream, live
    GET  /runs/<run_id>/watch             a page whose EventSource shows those events as they come

The events endpoint is `better_agent_peewee.sse.event_stream` over `storage.streams.resume`.
Each SSE message carries the event's seq as its id, so a browser's EventSource that
reconnects sends ``Last-Event-ID`` and picks up where it left off (``?after=N`` does the
same by hand). When the stream is closed and every event was sent, the endpoint sends an
``end`` event and the response ends; call ``source.close()`` on it, or EventSource
reconnects. When the run's worker died (no heartbeat for the followers' stale limit) it
sends an ``error`` event with problem details (code ``STALE_RUN``) instead. While the
stream is idle it sends a comment line every ``SSE_HEARTBEAT_SECONDS`` (so proxies keep
the connection), and after
``SSE_MAX_SECONDS`` it ends the response (the browser reconnects and resumes).

The demo agent (`demo_agent`) stands in for a model: it streams its reply back word by
word. `POST /threads/<thread_id>/runs` starts the run in the request, so the run can be
followed and aborted at once, and a pool of worker threads (``AGENT_WORKERS``) executes
it inside ``with run:`` (`storage.runs.track`), which records how it ended.

Connections: the database is pooled (`open_database(url, pooled=True)`), each request
takes a connection when it first queries and gives it back when it ends (for the events
endpoint: when the view returns, before the stream is sent), and followers hold none:
the storage's one poller thread reads for all of them on one connection. Served by a
threaded server (``app.run(threaded=True)``: a thread per open response), one process
follows a thousand runs for a thousand browser tabs.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Union

import peewee
from flask import Flask, Response, jsonify, request

from better_agent_peewee import (
    ConnectionLostError,
    NotFoundError,
    PoolExhaustedError,
    RunAborted,
    RunEndedElsewhere,
    StorageError,
    TrackedRun,
    create_tables,
    open_database,
    peewee_storage,
)
from better_agent_peewee.sse import SSE_HEADERS, event_stream, resume_point

logger = logging.getLogger(__name__)


def create_app(database: Union[str, peewee.Database, None] = None, **config: Any) -> Flask:
    """The Flask app over `database`: a URL, a Peewee database, or None for $DATABASE_URL
    (default ``sqlite:///agent.db``). `config` updates ``app.config``."""
    app = Flask(__name__)
    app.config.update(SSE_HEARTBEAT_SECONDS=15.0, SSE_MAX_SECONDS=300.0, SSE_POLL_SECONDS=0.1,
                      AGENT_WORKERS=4, AGENT_WORD_SECONDS=0.05)
    app.config.update(config)
    if database is None or isinstance(database, str):
        database = open_database(database or os.environ.get("DATABASE_URL") or "sqlite:///agent.db",
                                 pooled=True)
    db = database
    # Convenient for a demo. In production create the tables once, as a migration user
    # (`better-agent-peewee init`), and run the app as a user that cannot (see the README).
    create_tables(db)
    storage = peewee_storage(db)
    app.extensions["agent_storage"] = storage
    # The workers that execute runs; `app.extensions["agent_workers"].shutdown()` stops them.
    workers = ThreadPoolExecutor(app.config["AGENT_WORKERS"], thread_name_prefix="agent")
    app.extensions["agent_workers"] = workers

    @app.teardown_appcontext
    def release_connection(exc: Optional[BaseException]) -> None:
        # Back to the pool (a plain database: closed). Flask runs this when the view returns,
        # and for a stream_with_context response once more after the stream ends.
        if not db.is_closed() and not db.in_transaction():
            db.close()

    @app.errorhandler(NotFoundError)
    def not_found(exc: NotFoundError) -> Any:
        return jsonify(error=str(exc)), 404

    @app.errorhandler(PoolExhaustedError)
    @app.errorhandler(ConnectionLostError)
    def unavailable(exc: StorageError) -> Any:
        return jsonify(error=str(exc)), 503

    @app.errorhandler(StorageError)
    @app.errorhandler(ValueError)
    def bad_request(exc: Exception) -> Any:
        return jsonify(error=str(exc)), 400

    @app.get("/threads")
    def list_threads() -> Any:
        threads = storage.memory.threads.list(agent_name=request.args.get("agent"),
                                              limit=request.args.get("limit", 50, type=int))
        return jsonify(threads=threads)

    @app.get("/threads/<thread_id>")
    def show_thread(thread_id: str) -> Any:
        thread = storage.memory.threads.get(thread_id)
        if thread is None:
            return jsonify(error=f"no thread {thread_id!r}"), 404
        messages = storage.memory.messages.list(thread_id, limit=request.args.get("limit", type=int))
        return jsonify(thread=thread, messages=messages)

    @app.post("/threads/<thread_id>/runs")
    def start_run(thread_id: str) -> Any:
        text = (request.get_json(silent=True) or {}).get("message")
        if not isinstance(text, str) or not text.strip():
            return jsonify(error='a JSON body {"message": "..."} with a non-empty message is needed'), 400
        run = storage.runs.track(f"run-{uuid.uuid4().hex}", "demo-agent", thread_id=thread_id,
                                 messages=[{"role": "user", "content": text}])
        run.start()  # the run, the user's message and the stream, written before we answer
        workers.submit(execute_run, db, run, text, app.config["AGENT_WORD_SECONDS"])
        return jsonify(runId=run.run_id), 202

    @app.get("/runs/<run_id>")
    def show_run(run_id: str) -> Any:
        run = storage.runs.get(run_id)
        if run is None:
            return jsonify(error=f"no run {run_id!r}"), 404
        return jsonify(run)

    @app.post("/runs/<run_id>/abort")
    def abort_run(run_id: str) -> Any:
        # requested: the worker stops at its next check; or already_requested, or not_running.
        answer = storage.runs.request_abort(run_id)  # NotFoundError -> 404
        return jsonify(requested=bool(answer), abort=answer.value)

    @app.get("/runs/<run_id>/events")
    def run_events(run_id: str) -> Any:
        # ValueError -> 400
        after = resume_point(request.headers.get("Last-Event-ID"), request.args.get("after"))
        # Raises NotFoundError (-> 404) now, before any byte is sent, when there is no stream.
        body = event_stream(storage, run_id, after, heartbeat=app.config["SSE_HEARTBEAT_SECONDS"],
                            max_seconds=app.config["SSE_MAX_SECONDS"],
                            poll_interval=app.config["SSE_POLL_SECONDS"], retry_ms=2000, end_event=True)
        # No stream_with_context: the body needs no app context, so the request's connection goes
        # back to the pool as the view returns, and the open response holds none.
        return Response(body, headers=SSE_HEADERS)

    @app.get("/runs/<run_id>/watch")
    def watch_run(run_id: str) -> Any:
        return Response(WATCH_PAGE.replace("RUN_ID_JSON", json.dumps(run_id).replace("<", "\\u003c")),
                        mimetype="text/html")

    return app


def execute_run(db: peewee.Database, run: TrackedRun, text: str, word_seconds: float) -> None:
    """What a worker does with a run: `demo_agent` inside ``with run:``, which records the end."""
    try:
        with run:  # completed; failed on an exception; aborted (quietly) on RunAborted
            demo_agent(run, text, word_seconds)
    except Exception:
        logger.exception("run %s failed", run.run_id)  # recorded on the run; the worker goes on
    finally:
        db.close()  # back to the pool: an idle worker holds none


def demo_agent(run: TrackedRun, text: str, word_seconds: float) -> None:
    """Streams its reply word by word, as a model streams tokens, and stores it in the thread.

    It checks for an abort before it starts the message (a run aborted while it waited in the
    queue streams no message at all), and an abort mid-reply keeps what was said: the message
    is ended and stored with the words sent so far, then the abort ends the run.
    """
    message_id = f"{run.run_id}-reply"
    reply = f"You said: {text}"
    run.check_abort()  # aborted while queued: stop before anything is said
    run.emit({"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"})
    said: List[str] = []
    try:
        for word in reply.split(" "):
            run.check_abort()  # RunAborted once someone POSTs /runs/<id>/abort
            time.sleep(word_seconds)  # the model thinking
            run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": word + " "})
            said.append(word)
    except RunEndedElsewhere:
        raise  # (a RunAborted too) ended by someone else, the reaper say: the run takes no more writes
    except RunAborted:
        keep_partial_reply(run, message_id, said)
        raise  # the block records the run as aborted
    run.emit({"type": "TEXT_MESSAGE_END", "messageId": message_id})
    run.append_messages([{"id": message_id, "role": "assistant", "content": reply}])


def keep_partial_reply(run: TrackedRun, message_id: str, said: List[str]) -> None:
    """On an abort: end the open message on the stream and store what was said, if anything."""
    run.emit({"type": "TEXT_MESSAGE_END", "messageId": message_id})
    if said:
        run.append_messages([{"id": message_id, "role": "assistant", "content": " ".join(said)}])


#: The watch page: an EventSource on the events endpoint, one list item per event.
WATCH_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>run events</title></head>
<body>
<h1 id="status">following</h1>
<ol id="events"></ol>
<script>
const runId = RUN_ID_JSON;
const source = new EventSource("/runs/" + encodeURIComponent(runId) + "/events");
source.onmessage = (message) => {
  const event = JSON.parse(message.data);
  const item = document.createElement("li");
  item.dataset.seq = event.seq;
  item.textContent = event.type + (event.delta ? " " + event.delta : "");
  document.getElementById("events").appendChild(item);
};
source.addEventListener("end", (message) => {
  source.close();  // or EventSource reconnects
  document.getElementById("status").textContent = "ended: " + JSON.parse(message.data).reason;
});
source.addEventListener("error", (message) => {
  if (!message.data) return;  // a dropped connection: EventSource reconnects by itself
  source.close();  // the server's error frame (problem details): the run failed, e.g. STALE_RUN
  document.getElementById("status").textContent = "failed: " + JSON.parse(message.data).code;
});
</script>
</body></html>
"""


if __name__ == "__main__":
    create_app().run(threaded=True)
