"""The examples run: each script through a real subprocess, the Flask app through its test client,
on SQLite, PostgreSQL and MariaDB; afterwards the database holds what each example says it wrote."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, Optional

import peewee
import pytest
from werkzeug.serving import make_server

from better_agent_peewee import create_tables, peewee_storage
from tests.test_server import RawSse, Served, events, frames

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 120


def run_example(script: str, *args: str, url: Optional[str] = None, cwd: Optional[Path] = None,
                env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Run examples/`script` in a subprocess; `url` goes in DATABASE_URL (none: the default file)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "PRUNE_"))}
    if url is not None:
        environ["DATABASE_URL"] = url
    environ.update(env or {})
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            env=environ, cwd=cwd, timeout=TIMEOUT)
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def events_of(storage: Any, run_id: str) -> List[Dict[str, Any]]:
    items: List[Dict[str, Any]] = storage.list("streamEvents", {"where": {"runId": run_id},
                                                                "orderBy": {"seq": "asc"}})["items"]
    return items


# -- quickstart and prune_cron ------------------------------------------------------------

def test_quickstart_then_prune_cron(database: peewee.Database, database_url: str, tmp_path: Path) -> None:
    out = run_example("quickstart.py", url=database_url, cwd=tmp_path).stdout
    assert "follower:  saw 12 events, seq 1..12" in out, out
    assert "Peewee is a small, expressive ORM for Python." in out
    assert not (tmp_path / "agent.db").exists()  # DATABASE_URL was used, not the default file

    storage = peewee_storage(database)
    (thread,) = storage.memory.threads.list(agent_name="assistant")
    assert thread["id"] in out and thread["title"] == "Quickstart"
    messages = storage.memory.messages.list(thread["id"])
    assert [(m["role"], m["id"]) for m in messages] == [("user", "msg-1"), ("assistant", "msg-2")]
    run = storage.runs.latest_for_thread(thread["id"])
    assert run is not None and run["status"] == "completed" and run["finalEvent"]["type"] == "RUN_FINISHED"
    assert messages[1]["runId"] == run["runId"]
    stream = storage.streams.get(run["runId"])
    assert stream is not None and stream["status"] == "closed"
    events = events_of(storage, run["runId"])
    assert [e["seq"] for e in events] == list(range(1, 13))
    assert events[0]["event"]["type"] == "RUN_STARTED" and events[-1]["event"]["type"] == "RUN_FINISHED"

    # The nightly job: with a cutoff of now, the finished run goes, with its stream and events.
    result = run_example("prune_cron.py", url=database_url, cwd=tmp_path,
                         env={"PRUNE_OLDER_THAN": "0s", "PRUNE_REAP_STALE": "1h", "PRUNE_BATCH_SIZE": "10"})
    assert "pruned 1 runs, 1 streams, 12 events" in result.stderr, result.stderr
    assert "reaped 0 stale runs" in result.stderr
    assert storage.runs.get(run["runId"]) is None and storage.streams.get(run["runId"]) is None
    assert events_of(storage, run["runId"]) == []
    assert len(storage.memory.messages.list(thread["id"])) == 2  # memory is never pruned


@pytest.mark.sqlite
def test_quickstart_default_file_and_path_argument(tmp_path: Path) -> None:
    """Without DATABASE_URL it writes ./agent.db, and running it again adds a conversation."""
    first = run_example("quickstart.py", cwd=tmp_path).stdout
    second = run_example("quickstart.py", cwd=tmp_path).stdout
    assert "database:  sqlite:///agent.db (sqlite)" in first
    assert "threads of agent 'assistant' in this database: 1" in first
    assert "threads of agent 'assistant' in this database: 2" in second
    other = run_example("quickstart.py", "other.db", cwd=tmp_path).stdout
    assert "threads of agent 'assistant' in this database: 1" in other
    db = peewee.SqliteDatabase(str(tmp_path / "agent.db"))
    try:
        assert len(peewee_storage(db).memory.threads.list()) == 2
        assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


# -- worker_pool -----------------------------------------------------------------------------

def test_worker_pool(database: peewee.Database, database_url: str, tmp_path: Path) -> None:
    steps = 8
    out = run_example("worker_pool.py", "--runs", "6", "--workers", "3", "--steps", str(steps),
                      url=database_url, cwd=tmp_path).stdout
    assert "6 runs on 3 workers" in out and "Pooled" in out, out

    storage = peewee_storage(database)
    runs = storage.list("runs", {"where": {"agentName": "worker-demo"}})["items"]
    assert len(runs) == 6
    by_id = {run["runId"]: run for run in runs}
    ordered = sorted(by_id, key=lambda run_id: int(run_id.rsplit("-", 1)[1]))
    first, last = ordered[0], ordered[-1]
    for run_id in ordered:
        run = by_id[run_id]
        events = events_of(storage, run_id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
        assert events[0]["event"]["type"] == "RUN_STARTED"
        stream = storage.streams.get(run_id)
        assert stream is not None and stream["status"] == "closed"
        assert "finishedAt" in run
        steps_done = sum(e["event"]["type"] == "STEP_FINISHED" for e in events)
        if run["status"] == "aborted":
            assert "abortRequestedAt" in run and run["finalEvent"]["type"] == "RUN_ERROR"
            assert events[-1]["event"]["type"] == "RUN_ERROR" and steps_done < steps
        else:
            assert run["status"] == "completed", run
            assert run["finalEvent"]["type"] == "RUN_FINISHED" and steps_done == steps
            assert run_id == first or "abortRequestedAt" not in run  # only the first may have been too late
    # The run aborted while it waited in the queue never took a step.
    assert by_id[last]["status"] == "aborted"
    assert [e["event"]["type"] for e in events_of(storage, last)] == ["RUN_STARTED", "RUN_ERROR"]
    # The run aborted in progress had taken its first step (it may also have completed first).
    assert sum(e["event"]["type"] == "STEP_FINISHED" for e in events_of(storage, first)) >= 1
    assert all(by_id[run_id]["status"] == "completed" for run_id in ordered[1:-1])


# -- flask_app ---------------------------------------------------------------------------------

def load_flask_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_flask_app", EXAMPLES / "flask_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app(database_url: str) -> Iterator[Any]:
    app = load_flask_example().create_app(database_url, SSE_HEARTBEAT_SECONDS=0.1, AGENT_WORD_SECONDS=0.0)
    yield app
    app.extensions["agent_workers"].shutdown(wait=True)
    app.extensions["agent_storage"].database.close_all()


def login(app: Any, user: str) -> Any:
    """A test client logged in as `user` (the example's demo login: a session cookie)."""
    client = app.test_client()
    assert client.post("/login", json={"user": user}).json == {"user": user}
    return client


def sse_messages(body: bytes) -> List[Dict[str, str]]:
    """The messages of an SSE body (comments and retry hints become {"comment"/"retry": ...})."""
    messages = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        fields: Dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ") if not line.startswith(":") else ("comment", "", line[2:])
            fields[name] = value
        messages.append(fields)
    return messages


def test_flask_serves_better_agents_routes_for_the_session_user(app: Any) -> None:
    storage = app.extensions["agent_storage"]
    alice, bob, nobody = login(app, "alice"), login(app, "bob"), app.test_client()
    created = alice.post("/api/agents/demo/threads", json={"title": "Trip"})
    assert created.status_code == 201 and created.json["title"] == "Trip"
    thread_id = created.json["id"]
    assert storage.memory.threads.get(thread_id)["scope"] == "subject:alice"
    assert alice.get("/api/agents/demo/threads").json == {"threads": [created.json]}
    assert bob.get("/api/agents/demo/threads").json == {"threads": []}
    assert bob.get(f"/api/agents/demo/threads/{thread_id}").status_code == 404
    refused = nobody.get("/api/agents/demo/threads")
    assert refused.status_code == 401 and refused.content_type == "application/problem+json"
    assert refused.json["code"] == "UNAUTHORIZED"
    # A run answered as JSON, then one streamed as Better Agent's server streams it.
    question = {"threadId": thread_id, "messages": [{"role": "user", "content": "hello there"}]}
    answer = alice.post("/api/agents/demo/run", json=question).json
    assert answer["outcome"] == "success" and answer["threadId"] == thread_id
    assert [(m["role"], m["content"]) for m in answer["messages"]] == [("assistant", "You said: hello there")]
    streamed = alice.post("/api/agents/demo/run", json=question, headers={"Accept": "text/event-stream"})
    assert streamed.status_code == 200 and streamed.headers["Cache-Control"] == "no-cache, no-transform"
    frames = sse_messages(streamed.get_data())
    assert all(set(f) == {"data"} for f in frames)  # live frames: `data:` only
    assert [json.loads(f["data"])["type"] for f in frames][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    run_id = streamed.headers["X-Run-Id"]
    replay = sse_messages(alice.get(f"/api/agents/runs/{run_id}/stream", headers={"Last-Event-ID": "3"}
                                    ).get_data())
    assert [f["id"] for f in replay] == [str(seq) for seq in range(4, len(frames) + 1)]
    assert bob.get(f"/api/agents/runs/{run_id}/stream").status_code == 404
    listed = alice.get(f"/api/agents/demo/threads/{thread_id}/messages").json["messages"]
    assert [m["content"] for m in listed] == ["hello there", "You said: hello there"] * 2
    assert alice.post("/logout").json == {"user": None}
    assert alice.get("/api/agents/demo/threads").status_code == 401
    assert storage.database.is_closed()  # every request gave its connection back
    page = alice.get(f"/runs/{run_id}/watch")
    assert page.status_code == 200 and b'"/api/agents"' in page.data and run_id.encode() in page.data


def test_flask_app_with_a_plain_database(database: peewee.Database) -> None:
    """create_app also takes a Peewee database object (here not pooled) and creates the tables."""
    app = load_flask_example().create_app(database)
    storage = app.extensions["agent_storage"]
    assert storage.database is database
    create_tables(database)  # already there: a no-op
    storage.memory.threads.set("t", {"id": "t", "agentName": "demo", "scope": "subject:alice",
                                     "createdAt": 1, "updatedAt": 1})
    assert [t["id"] for t in login(app, "alice").get("/api/agents/demo/threads").json["threads"]] == ["t"]
    assert database.is_closed()
    app.extensions["agent_workers"].shutdown(wait=True)


def test_open_database_pooled_picks_the_pool_class_of_the_url() -> None:
    """`open_database(url, pooled=True)`, which the examples use: the playhouse.pool class, same settings."""
    from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

    from better_agent_peewee.cli import SQLITE_PRAGMAS, open_database

    sqlite = open_database("sqlite:///agent.db", pooled=True, max_connections=3)
    assert isinstance(sqlite, PooledSqliteDatabase) and sqlite._max_connections == 3
    assert dict(sqlite._pragmas) == SQLITE_PRAGMAS
    pg = open_database("postgresql://app:p%40ss@db.internal:5433/app", pooled=True)
    assert isinstance(pg, PooledPostgresqlDatabase)
    assert pg.connect_params == {"user": "app", "password": "p@ss", "host": "db.internal", "port": 5433}
    mysql = open_database("mysql://app:secret@db.internal/app", pooled=True)
    assert isinstance(mysql, PooledMySQLDatabase) and mysql.connect_params["charset"] == "utf8mb4"
    assert isinstance(open_database("postgresql+pool://app@db.internal/app", pooled=True),
                      PooledPostgresqlDatabase)
    assert not isinstance(open_database("postgresql://app@db.internal/app"), PooledPostgresqlDatabase)


def test_flask_runs_stop_when_aborted_and_keep_what_was_said(database_url: str) -> None:
    """An abort mid-reply keeps the words said; a run aborted while it waits for a worker says nothing."""
    app = load_flask_example().create_app(database_url, AGENT_WORKERS=1, AGENT_WORD_SECONDS=0.2)
    storage = app.extensions["agent_storage"]
    client = login(app, "alice")
    stream = {"Accept": "text/event-stream"}
    try:
        slow = client.post("/api/agents/demo/run", headers=stream, buffered=False, json={
            "threadId": "t9", "messages": [{"role": "user", "content": "take your time please"}]})
        slow_body = iter(slow.response)
        seen = b""
        while seen.count(b"TEXT_MESSAGE_CONTENT") < 2:
            seen += next(slow_body)
        # The one worker is busy: this run waits in the queue, and is aborted there.
        queued = client.post("/api/agents/demo/run", headers=stream, buffered=False, json={
            "threadId": "t9", "messages": [{"role": "user", "content": "me next"}]})
        queued_id = queued.headers["X-Run-Id"]
        assert client.post(f"/api/agents/runs/{queued_id}/abort").status_code == 204
        assert client.post(f"/api/agents/runs/{slow.headers['X-Run-Id']}/abort").status_code == 204
        slow_events = [json.loads(f["data"]) for f in sse_messages(seen + b"".join(slow_body))]
        queued_events = [json.loads(f["data"]) for f in sse_messages(b"".join(queued.response))]
    finally:
        app.extensions["agent_workers"].shutdown(wait=True)
    assert [e["type"] for e in queued_events] == ["RUN_STARTED", "RUN_ERROR"]
    assert queued_events[-1]["code"] == "ABORTED"
    assert slow_events[-2]["type"] == "TEXT_MESSAGE_END" and slow_events[-1]["code"] == "ABORTED"
    said = [e["delta"] for e in slow_events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    kept = [m for m in storage.memory.messages.list("t9") if m["runId"] == slow.headers["X-Run-Id"]]
    assert [m["role"] for m in kept] == ["user", "assistant"]
    assert kept[1]["content"] == " ".join(word.strip() for word in said)
    assert [m["role"] for m in storage.memory.messages.list("t9") if m["runId"] == queued_id] == ["user"]
    assert {storage.runs.get(r)["status"] for r in (queued_id, slow.headers["X-Run-Id"])} == {"aborted"}
    storage.database.close_all()


# -- the Django example: Better Agent's routes behind one URL include --------------------------

_django: Dict[str, ModuleType] = {}


def load_django_example() -> ModuleType:
    """examples/django_app.py, loaded once (Django's settings and URL resolver are per process)."""
    if "module" not in _django:
        spec = importlib.util.spec_from_file_location("examples_django_app", EXAMPLES / "django_app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["examples_django_app"] = module  # its ROOT_URLCONF
        spec.loader.exec_module(module)
        _django["module"] = module
    return _django["module"]


def test_django_serves_better_agents_routes(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_WORD_SECONDS", "0.02")
    django_app = load_django_example().create_app(database_url)
    server = make_server("127.0.0.1", 0, django_app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    client = Served(server.server_port)
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    try:
        assert client.json("GET", "/", user=None) == (200, {"hello": "django"})  # the project's own view
        status, thread = client.json("POST", "/api/agents/echo/threads", {"title": "Plans"}, user=None,
                                     headers=alice)
        assert status == 201 and thread["title"] == "Plans"
        path = f"/api/agents/echo/threads/{thread['id']}"
        assert client.json("GET", path, user=None, headers=alice) == (200, thread)
        status, missing = client.json("GET", path, user=None, headers=bob)
        assert (status, missing["code"]) == (404, "NOT_FOUND")
        assert client.json("GET", path, user=None)[0] == 401
        # A streamed run through Django: Better Agent's frames, headers, and the body's end.
        status, headers, body = client.call("POST", "/api/agents/echo/run", {
            "threadId": "a/b", "messages": [{"role": "user", "content": "hi there"}]}, user=None,
            headers={**alice, "Accept": "text/event-stream"})
        assert status == 200 and headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "no-cache, no-transform" and headers["x-run-id"]
        assert all(set(f) == {"data"} for f in frames(body))
        assert [e["type"] for e in events(body)][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
        # The thread id with a slash, as the client sends it (encodeURIComponent).
        status, listed = client.json("GET", "/api/agents/echo/threads/a%2Fb/messages", user=None,
                                     headers=alice)
        assert status == 200 and [m["content"] for m in listed["messages"]] == ["hi there", "hi there"]
        status, headers, body = client.call("DELETE", path, user=None, headers=alice)
        assert (status, body) == (204, b"") and "content-type" not in headers
        # A client that goes away: its run is aborted.
        reader = RawSse(server.server_port, "/api/agents/echo/run", "POST", json.dumps(
            {"threadId": "long", "messages": [{"role": "user", "content": "w " * 200}]}).encode(),
            headers=alice)
        reader.read_until(b"TEXT_MESSAGE_START")
        run_id = reader.run_id()
        reader.drop()
        storage = load_django_example().create_storage(database_url)
        deadline = time.monotonic() + 30
        while storage.runs.get(run_id) and storage.runs.get(run_id)["status"] == "running" \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storage.runs.get(run_id)["status"] == "aborted"
    finally:
        server.shutdown()
        serving.join(30)
