"""A Flask app that serves a Better Agent frontend: its routes, for the logged-in user, over the storage.

    pip install flask
    python examples/quickstart.py                       # some data to look at (./agent.db)
    flask --app examples/flask_app run --with-threads   # http://127.0.0.1:5000/
    DATABASE_URL=postgresql://app:secret@localhost/app flask --app examples/flask_app run --with-threads

Routes:

    POST /login {"user": "alice"}    the demo login (no password: a demo): a session cookie
    POST /logout
    /api/agents/...                  Better Agent's routes (docs/server.md), for the session's user:
                                     POST /api/agents/demo/run, GET /api/agents/demo/threads, ...
    GET  /runs/<run_id>/watch        a page that follows a run's events and resumes after a drop

Better Agent's client (``createClient({baseURL: "/api/agents"})``) works against it unchanged.
The routes are `better_agent_peewee.wsgi_app`, mounted with werkzeug's `DispatcherMiddleware`;
its auth resolver reads Flask's session cookie, so the user logged in here is the subject
whose threads the routes show (scope ``subject:<user>``). The cookie is ``SameSite=Lax``: a
form on another site cannot post to the routes with it.

The demo agent (`demo_agent`) stands in for a model: it streams its reply back word by word.
A streamed run (``Accept: text/event-stream``) executes on a pool of worker threads
(``AGENT_WORKERS``) while the request's thread sends its events; a run started with a
JSON request executes in the request's thread. An abort (``POST
/api/agents/runs/<id>/abort``, or the client going away) stops it at its next check: before
it starts its message (a run aborted while queued says nothing), or mid-reply (what was said
is kept in the thread).

Connections: the database is pooled (`open_database(url, pooled=True)`); a request gives its
connection back when it ends, an open SSE response holds none (the storage's one poller
thread reads for every follower), and an idle worker holds none. Served by a threaded server
(a thread per open response), one process follows a thousand runs for a thousand tabs.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Union

import peewee
from flask import Flask, Response, jsonify, request, session
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from better_agent_peewee import (
    RunAborted,
    RunEndedElsewhere,
    RunRequest,
    TrackedRun,
    create_tables,
    open_database,
    peewee_storage,
    wsgi_app,
)

logger = logging.getLogger(__name__)

#: Where Better Agent's routes are mounted (the client's ``baseURL``).
AGENTS_PATH = "/api/agents"


def create_app(database: Union[str, peewee.Database, None] = None, **config: Any) -> Flask:
    """The Flask app over `database`: a URL, a Peewee database, or None for $DATABASE_URL
    (default ``sqlite:///agent.db``). `config` updates ``app.config``."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY=os.environ.get("FLASK_SECRET_KEY", "demo only: set FLASK_SECRET_KEY"),
                      SESSION_COOKIE_SAMESITE="Lax", SSE_HEARTBEAT_SECONDS=15.0, AGENT_WORKERS=4,
                      AGENT_WORD_SECONDS=0.05)
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
    # The workers that execute streamed runs; `app.extensions["agent_workers"].shutdown()` stops them.
    workers = ThreadPoolExecutor(app.config["AGENT_WORKERS"], thread_name_prefix="agent")
    app.extensions["agent_workers"] = workers

    def session_auth(environ: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The auth context of the request: the user of Flask's session cookie, if any."""
        cookie = app.session_interface.open_session(app, app.request_class(environ))
        user = cookie.get("user") if cookie is not None else None
        return {"subject": user} if isinstance(user, str) and user else None

    def demo(run: TrackedRun, run_request: RunRequest) -> Dict[str, Any]:
        return demo_agent(run, run_request, app.config["AGENT_WORD_SECONDS"])

    agents = wsgi_app(storage, agents={"demo": demo}, auth=session_auth, executor=workers,
                      heartbeat=app.config["SSE_HEARTBEAT_SECONDS"])
    app.extensions["agent_routes"] = agents
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {AGENTS_PATH: agents})  # type: ignore[method-assign]

    @app.teardown_appcontext
    def release_connection(exc: Optional[BaseException]) -> None:
        if not db.is_closed() and not db.in_transaction():
            db.close()  # back to the pool (a plain database: closed)

    @app.post("/login")
    def login() -> Any:
        user = (request.get_json(silent=True) or {}).get("user")
        if not isinstance(user, str) or not user.strip():
            return jsonify(error='a JSON body {"user": "..."} with a non-empty user is needed'), 400
        session["user"] = user.strip()
        return jsonify(user=session["user"])

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return jsonify(user=None)

    @app.get("/runs/<run_id>/watch")
    def watch_run(run_id: str) -> Any:
        page = WATCH_PAGE.replace("RUN_ID_JSON", json.dumps(run_id).replace("<", "\\u003c"))
        return Response(page.replace("AGENTS_PATH_JSON", json.dumps(AGENTS_PATH)), mimetype="text/html")

    return app


def demo_agent(run: TrackedRun, run_request: RunRequest, word_seconds: float) -> Dict[str, Any]:
    """Streams its reply word by word, as a model streams tokens, and stores it in the thread.

    It checks for an abort before it starts the message (a run aborted while it waited in the
    queue streams no message at all), and an abort mid-reply keeps what was said: the message
    is ended and stored with the words sent so far, then the abort ends the run.
    """
    text = next((m.get("content") for m in reversed(run_request.messages) if m.get("role") == "user"), "")
    message_id = f"{run.run_id}-reply"
    reply = f"You said: {text}"
    run.check_abort()  # aborted while queued: stop before anything is said
    run.emit({"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"})
    said: List[str] = []
    try:
        for word in reply.split(" "):
            run.check_abort()  # RunAborted once someone aborts the run
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
    return {"finishReason": "stop", "stepCount": 1}


def keep_partial_reply(run: TrackedRun, message_id: str, said: List[str]) -> None:
    """On an abort: end the open message on the stream and store what was said, if anything."""
    run.emit({"type": "TEXT_MESSAGE_END", "messageId": message_id})
    if said:
        run.append_messages([{"id": message_id, "role": "assistant", "content": " ".join(said)}])


#: The watch page: follows GET <agents>/runs/<id>/stream with fetch, reads the frames as Better
#: Agent's client does (`id:`, `data:`, `event: error`), and resumes after a dropped connection
#: with Last-Event-ID; the body's end is the run's end.
WATCH_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>run events</title></head>
<body>
<h1 id="status">following</h1>
<ol id="events"></ol>
<script>
const runId = RUN_ID_JSON, base = AGENTS_PATH_JSON;
let lastSeq = 0;
function show(event) {
  const item = document.createElement("li");
  item.dataset.seq = event.seq;
  item.textContent = event.type + (event.delta ? " " + event.delta.trim() : "");
  document.getElementById("events").appendChild(item);
}
function frame(lines) {  // one SSE frame: an event, or the server's error (problem details)
  let kind = "", id, data = "";
  for (const line of lines) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("id:")) id = Number(line.slice(3).trim());
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  if (kind === "error") throw new Error(JSON.parse(data).code);
  const event = JSON.parse(data);
  if (Number.isFinite(id)) { event.seq = id; lastSeq = id; }
  show(event);
}
async function follow() {
  for (;;) {
    try {
      const response = await fetch(base + "/runs/" + encodeURIComponent(runId) + "/stream",
                                   {headers: {"last-event-id": String(lastSeq)}});
      if (!response.ok) throw new Error((await response.json()).code);
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let buffer = "", lines = [];
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let at;
        while ((at = buffer.indexOf("\\n")) >= 0) {
          const line = buffer.slice(0, at).replace(/\\r$/, "");
          buffer = buffer.slice(at + 1);
          if (line === "") { frame(lines); lines = []; } else lines.push(line);
        }
      }
      document.getElementById("status").textContent = "ended";  // the end of the body: the run's
      return;
    } catch (error) {
      if (error instanceof TypeError) { await new Promise(r => setTimeout(r, 1000)); continue; }  // dropped
      document.getElementById("status").textContent = "failed: " + error.message;
      return;
    }
  }
}
follow();
</script>
</body></html>
"""


if __name__ == "__main__":
    create_app().run(threaded=True)
