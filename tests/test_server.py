"""`better_agent_peewee.server`: Better Agent's routes as a WSGI app, served for real (werkzeug in a
thread) on the three dialects. The expectations are Better Agent's own handler's (handler.ts,
auth/runtime.ts, errors.ts, the client's sse.ts): routes, JSON shapes, statuses, SSE bytes and
problem bodies; where this server differs on purpose (docs/server.md) the test says so.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import peewee
import pytest
from werkzeug.serving import make_server

from better_agent_peewee import PoolExhaustedError, RunAborted, create_tables, peewee_storage
from better_agent_peewee.records import now_ms
from better_agent_peewee.server import Problem, RunRequest, wsgi_app
from better_agent_peewee.server.control import after_seq
from better_agent_peewee.server.problems import problem_of
from better_agent_peewee.server.routes import limit_of
from tests.test_stale import dead_run

TYPE = "https://better-agent.com/docs/concepts/errors#"


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def header_auth(environ: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The test apps' auth: ``X-User: subject[@tenant]``; ``X-User: forged`` does not verify."""
    user = environ.get("HTTP_X_USER")
    if not user or user == "forged":
        return None
    subject, _, tenant = user.partition("@")
    return {"subject": subject, **({"tenant": tenant} if tenant else {})}


def echo(run: Any, request: RunRequest) -> Dict[str, Any]:
    """Replies with the last user message, word by word, checking for an abort before each word."""
    text = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
    delay = float(request.body.get("delay", 0))
    message_id = f"{run.run_id}-reply"
    run.check_abort()
    run.emit({"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"})
    for word in text.split():
        time.sleep(delay)
        run.check_abort()
        run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": word})
    run.emit({"type": "TEXT_MESSAGE_END", "messageId": message_id})
    run.append_messages([{"id": message_id, "role": "assistant", "content": text}])
    return {"finishReason": "stop", "stepCount": 1}


def broken(run: Any, request: RunRequest) -> None:
    raise RuntimeError("the model is down")


def asking(run: Any, request: RunRequest) -> None:
    """Asks for approval on its first run; on the resumed run it answers."""
    if request.resume is None:
        run.finish(interrupts=[{"id": "i1", "reason": "approval"}])
        return
    run.append_messages([{"id": f"{run.run_id}-ok", "role": "assistant", "content": "approved"}])


AGENTS = {"echo": echo, "broken": broken, "asking": asking, "remote": None}


class Served:
    """The app on a threaded werkzeug server on a free port, and a small HTTP client for it."""

    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: Any = None, *, user: Optional[str] = "alice",
             headers: Optional[Mapping[str, str]] = None, raw: Optional[bytes] = None
             ) -> Tuple[int, Dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = {"X-User": user} if user else {}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def json(self, method: str, path: str, body: Any = None, **options: Any) -> Tuple[int, Any]:
        status, headers, payload = self.call(method, path, body, **options)
        if status == 204:
            assert payload == b"" and "content-type" not in headers
            return status, None
        kind = headers["content-type"]
        assert kind == ("application/json" if status < 400 else "application/problem+json"), (status, kind)
        return status, json.loads(payload)


@contextlib.contextmanager
def serving(storage: Any, **options: Any) -> Iterator[Served]:
    options.setdefault("agents", AGENTS)
    options.setdefault("auth", header_auth)
    app = wsgi_app(storage, **options)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(server.server_port)
    finally:
        server.shutdown()
        thread.join(30)


def frames(body: bytes) -> List[Dict[str, str]]:
    """The frames of an SSE body as Better Agent's client reads them (comments kept as ``{":": ""}``)."""
    found = []
    for block in body.decode().split("\n\n")[:-1]:
        frame: Dict[str, str] = {}
        for line in block.split("\n"):
            key, _, value = line.partition(":")
            frame[key] = value.strip()
        found.append(frame)
    return found


def events(body: bytes) -> List[Dict[str, Any]]:
    return [json.loads(f["data"]) for f in frames(body) if "data" in f and "event" not in f]


def problem(code: str, status: int, title: str, detail: str, **context: Any) -> Dict[str, Any]:
    body = {"type": TYPE + code.lower().replace("_", "-"), "title": title, "status": status,
            "detail": detail, "code": code, "retryable": False}
    if context:
        body["context"] = context
    return body


def not_found(detail: str, **context: Any) -> Dict[str, Any]:
    return problem("NOT_FOUND", 404, "Not Found", detail, **context)


def counts(storage: Any) -> Tuple[int, ...]:
    return tuple(len(storage.list(table, {})["items"])
                 for table in ("memoryThreads", "memoryMessages", "runs", "streams", "streamEvents"))


# -- threads and messages -------------------------------------------------------------------------


def test_thread_routes_answer_as_better_agent(storage: Any) -> None:
    with serving(storage, base_path="/api/agents") as app:
        status, thread = app.json("POST", "/api/agents/echo/threads", {"title": "Trip", "metadata": {"k": 1}})
        assert status == 201
        assert list(thread) == ["id", "agentName", "title", "metadata", "createdAt", "updatedAt"]
        assert thread["id"].startswith("thread_") and thread["agentName"] == "echo"
        assert storage.memory.threads.get(thread["id"])["scope"] == "subject:alice"  # not answered
        path = f"/api/agents/echo/threads/{thread['id']}"
        assert app.json("GET", path) == (200, thread)
        assert app.json("GET", "/api/agents/echo/threads") == (200, {"threads": [thread]})
        status, updated = app.json("PATCH", path, {"title": "Trip 2", "metadata": "not an object"})
        assert status == 200 and updated["title"] == "Trip 2" and updated["metadata"] == {"k": 1}
        assert updated["updatedAt"] >= thread["updatedAt"]
        assert app.json("GET", path + "/messages") == (200, {"messages": []})
        assert app.json("GET", path + "/runtime") == (200, {})
        assert app.json("DELETE", path) == (204, None)
        assert app.json("DELETE", path) == (200, {})  # Better Agent answers a missing thread so
        assert app.json("GET", path) == (404, not_found(f"Thread '{thread['id']}' not found.",
                                                        threadId=thread["id"], agentName="echo"))


def test_a_patch_keeps_a_state_written_meanwhile_and_makes_no_deleted_thread_again(storage: Any) -> None:
    # Another writer holds the thread's row (a run's set_state, a DELETE) while the PATCH comes:
    # the PATCH must read the thread after that writer commits, not before (a lost update).
    def hold(write: Any, held: threading.Event) -> None:
        with storage.transaction():
            write()
            held.set()
            time.sleep(0.8)  # the PATCH arrives meanwhile
        storage.database.close()

    with serving(storage) as app:
        _, thread = app.json("POST", "/echo/threads", {"title": "Trip"})
        path = f"/echo/threads/{thread['id']}"
        threads = storage.memory.threads
        for write in (lambda: threads.set_state(thread["id"], {"step": 2}, now_ms()),
                      lambda: threads.delete(thread["id"])):
            held = threading.Event()
            writer = threading.Thread(target=hold, args=(write, held))
            writer.start()
            assert held.wait(10)
            status, body = app.json("PATCH", path, {"title": "Trip 2"})
            writer.join(30)
            if threads.get(thread["id"]) is None:  # deleted meanwhile: stays deleted, and 404
                assert status == 404 and app.json("GET", path)[0] == 404
            else:
                assert status == 200 and body["title"] == "Trip 2"
                assert threads.get(thread["id"])["state"] == {"step": 2}
        assert threads.get(thread["id"]) is None


def test_another_scope_sees_nothing_and_gets_the_404_of_a_missing_thread(storage: Any) -> None:
    with serving(storage) as app:
        _, mine = app.json("POST", "/echo/threads", {})
        _, tenant = app.json("POST", "/echo/threads", {}, user="alice@acme")
        assert storage.memory.threads.get(tenant["id"])["scope"] == "tenant:acme:subject:alice"
        assert [t["id"] for t in app.json("GET", "/echo/threads", user="bob")[1]["threads"]] == []
        assert [t["id"] for t in app.json("GET", "/echo/threads")[1]["threads"]] == [mine["id"]]
        for method in ("GET", "PATCH"):
            status, body = app.json(method, f"/echo/threads/{mine['id']}", {} if method == "PATCH" else None,
                                    user="bob")
            missing = app.json(method, "/echo/threads/nope", {} if method == "PATCH" else None, user="bob")
            assert status == 404 and json.dumps(body).replace(mine["id"], "nope") == json.dumps(missing[1])
        # DELETE as Better Agent: 404 for another scope's thread, but `{}` (200) for a missing one.
        assert app.json("DELETE", f"/echo/threads/{mine['id']}", user="bob")[0] == 404
        assert app.json("DELETE", "/echo/threads/nope", user="bob") == (200, {})
        for suffix in ("messages", "runtime"):
            assert app.json("GET", f"/echo/threads/{mine['id']}/{suffix}", user="bob")[0] == 404
        # Another agent's thread is not this agent's either.
        assert app.json("GET", f"/asking/threads/{mine['id']}")[0] == 404
        status, _ = app.json("POST", "/echo/run", {"threadId": mine["id"]}, user="bob")
        assert status == 404
        assert storage.memory.threads.get(mine["id"]) is not None


def test_messages_limit_and_before_run_id(storage: Any) -> None:
    with serving(storage) as app:
        ids = []
        for text in ("one", "two", "three"):
            status, result = app.json("POST", "/echo/run", {"threadId": "t1", "messages": [
                {"role": "user", "content": text}]})
            assert status == 200
            ids.append(result["runId"])
        listed = app.json("GET", "/echo/threads/t1/messages")[1]["messages"]
        assert [m["content"] for m in listed] == ["one", "one", "two", "two", "three", "three"]
        assert set(listed[0]) == {"id", "role", "content", "threadId", "runId", "createdAt"}
        last = app.json("GET", "/echo/threads/t1/messages?limit=3")[1]["messages"]
        assert [m["content"] for m in last] == ["two", "three", "three"]
        before = app.json("GET", f"/echo/threads/t1/messages?beforeRunId={ids[1]}&limit=1")[1]["messages"]
        assert [m["runId"] for m in before] == [ids[0]]
        for odd in ("0", "-1", "x", "", "0.5"):  # not a positive number: no limit, as Number() reads it
            assert len(app.json("GET", f"/echo/threads/t1/messages?limit={odd}")[1]["messages"]) == 6
        assert len(app.json("GET", "/echo/threads?limit=1.9")[1]["threads"]) == 1


# -- runs ----------------------------------------------------------------------------------------------


def test_a_json_run_writes_what_better_agent_writes(storage: Any) -> None:
    with serving(storage) as app:
        status, result = app.json("POST", "/echo/run", {
            "threadId": "t1", "context": {"plan": "pro"},
            "messages": [{"id": "client-id", "role": "user", "content": "hello world"}]})
    assert status == 200
    run_id = result["runId"]
    assert result == {"runId": run_id, "threadId": "t1", "outcome": "success", "finishReason": "stop",
                      "stepCount": 1, "messages": [{"id": f"{run_id}-reply", "role": "assistant",
                                                    "content": "hello world"}]}
    assert run_id.startswith("run_")
    thread = storage.memory.threads.get("t1")
    assert thread["scope"] == "subject:alice" and thread["agentName"] == "echo"
    question = storage.memory.messages.list("t1")[0]
    assert question["id"].startswith("message_") and question["runId"] == run_id  # the server's id
    run = storage.runs.get(run_id)
    assert run["status"] == "completed" and run["scope"] == "subject:alice"
    assert run["config"] == {"context": {"plan": "pro"}}
    assert run["finalEvent"]["result"] == {"finishReason": "stop", "stepCount": 1}
    started = storage.list("streamEvents", {"where": {"runId": run_id}, "orderBy": {"seq": "asc"}}
                           )["items"][0]["event"]
    assert started["type"] == "RUN_STARTED"
    assert started["input"] == {"runId": run_id, "threadId": "t1", "tools": [], "context": [],
                                "messages": [{"id": question["id"], "role": "user",
                                              "content": "hello world"}]}


def test_a_run_without_a_thread_keeps_its_messages_in_the_answer_only(storage: Any) -> None:
    with serving(storage) as app:
        before = counts(storage)[:2]
        status, result = app.json("POST", "/echo/run", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and "threadId" not in result  # absent, as Better Agent answers it
        reply = {"id": f"{result['runId']}-reply", "role": "assistant", "content": "hi"}
        assert result["messages"] == [reply]
        assert counts(storage)[:2] == before  # no thread, no message stored
        status, result = app.json("POST", "/echo/run", [1])  # not an object: a run with no input
        assert (status, result["outcome"]) == (200, "success")
        # A form body is read as Better Agent's router reads it (a dict of strings).
        status, headers, body = app.call("POST", "/echo/threads", raw=b"title=From+a+form&x=1",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 201 and json.loads(body)["title"] == "From a form"


def test_a_streamed_run_sends_better_agents_frames(storage: Any) -> None:
    with serving(storage) as app:
        status, headers, body = app.call("POST", "/echo/run", {"threadId": "t1", "messages": [
            {"role": "user", "content": "a b"}]}, headers={"Accept": "text/event-stream"})
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache, no-transform" and headers["x-accel-buffering"] == "no"
    run_id = headers["x-run-id"]
    # Live frames are `data:` lines only (no `id:`, no seq), as the TypeScript server sends them;
    # the body simply ends after the final event: no `end` frame.
    assert all(set(f) == {"data"} for f in frames(body)), body
    assert [e["type"] for e in events(body)] == ["RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT",
                                                 "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert body.endswith(b"\n\n") and body.startswith(b"data: {\"type\":\"RUN_STARTED\"")
    final = events(body)[-1]
    assert final["runId"] == run_id and final["outcome"] == "success"
    assert final["result"] == {"finishReason": "stop", "stepCount": 1}
    assert storage.runs.get(run_id)["status"] == "completed"


def test_a_failing_agent_ends_with_run_error(storage: Any) -> None:
    with serving(storage) as app:
        status, headers, body = app.call("POST", "/broken/run", {}, headers={"Accept": "text/event-stream"})
        assert status == 200
        assert [e["type"] for e in events(body)] == ["RUN_STARTED", "RUN_ERROR"]
        assert events(body)[-1]["message"] == "the model is down"
        status, answer = app.json("POST", "/broken/run", {})
    assert (status, answer) == (500, problem("INTERNAL", 500, "Internal Server Error", "the model is down"))
    assert {r["status"] for r in storage.list("runs", {})["items"]} == {"failed"}


def test_replay_with_last_event_id_and_heartbeats(storage: Any) -> None:
    with serving(storage, heartbeat=0.05) as app:
        _, result = app.json("POST", "/echo/run", {"messages": [{"role": "user", "content": "x y z"}]})
        run_id = result["runId"]
        _, headers, body = app.call("GET", f"/runs/{run_id}/stream", headers={"Last-Event-ID": "2"})
        assert headers["x-run-id"] == run_id and headers["content-type"] == "text/event-stream"
        replayed = frames(body)
        assert [f["id"] for f in replayed] == ["3", "4", "5", "6", "7"]
        assert [json.loads(f["data"])["seq"] for f in replayed] == [3, 4, 5, 6, 7]
        assert body.startswith(b"id: 3\ndata: {")
        for odd, first in (("abc", 1), ("", 1), ("-4", 1), ("2.7", 3), ("0x2", 3)):  # as Number() reads it
            body = app.call("GET", f"/echo/stream?runId={run_id}", headers={"Last-Event-ID": odd})[2]
            assert frames(body)[0]["id"] == str(first), odd
        # A quiet stream: bare `:` comments, and no cut at a time limit.
        storage.streams.open("quiet")
        storage.runs.start("quiet", "echo")
        reader = RawSse(app.port, "/runs/quiet/stream")
        reader.read_until(b":\n\n", 3)  # (however long the first ones take on a loaded machine)
        storage.streams.append("quiet", {"type": "STEP_STARTED", "stepName": "late"})
        storage.streams.close("quiet")
        body = reader.read_all()
    assert body.count(b":\n\n") >= 3
    # (a heartbeat may come between the event and the close when the machine is slow)
    assert [f["id"] for f in frames(body) if "data" in f] == ["1"] and body.endswith(b"\n\n")


class RawSse:
    """An SSE request on a raw socket, read to the end (or dropped by `drop`)."""

    def __init__(self, port: int, path: str, method: str = "GET", body: Optional[bytes] = None,
                 user: str = "alice", headers: Optional[Mapping[str, str]] = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        extra = "".join(f"{name}: {value}\r\n" for name, value in {"X-User": user, **(headers or {})}.items())
        head = (f"{method} {path} HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\n{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body or b'')}\r\n\r\n")
        self.sock.sendall(head.encode() + (body or b""))
        self.data = b""

    def read_until(self, needle: bytes, count: int = 1) -> bytes:
        while self.data.count(needle) < count:
            chunk = self.sock.recv(65536)
            assert chunk, self.data
            self.data += chunk
        return self.data

    def run_id(self) -> str:
        head = self.read_until(b"\r\n\r\n").partition(b"\r\n\r\n")[0].lower()
        return head.split(b"x-run-id: ", 1)[1].split(b"\r\n", 1)[0].decode()

    def read_all(self) -> bytes:
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.data += chunk
        self.sock.close()
        head, _, body = self.data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            out, rest = b"", body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                out, rest = out + rest[:n], rest[n + 2:]
            body = out
        return body

    def drop(self) -> None:
        self.sock.close()


def test_abort_by_run_id_and_by_agent(storage: Any) -> None:
    with serving(storage) as app:
        for how in ("run", "agent"):
            # (in a thread: the agent's running run is looked up in the caller's scope, a thread's)
            reader = RawSse(app.port, "/echo/run", "POST", json.dumps(
                {"delay": 0.05, "threadId": how, "messages": [{"role": "user", "content": "w " * 200}]}
            ).encode())
            reader.read_until(b"TEXT_MESSAGE_CONTENT")
            run_id = reader.run_id()
            path = f"/runs/{run_id}/abort" if how == "run" else "/echo/abort"
            assert app.json("POST", path) == (204, None)
            body = reader.read_all()
            assert events(body)[-1] == {**events(body)[-1], "type": "RUN_ERROR", "code": "ABORTED"}
            assert storage.runs.get(run_id)["status"] == "aborted"
        # The run has ended: aborting again changes nothing and still answers 204.
        assert app.json("POST", f"/runs/{run_id}/abort") == (204, None)
        assert app.json("POST", "/runs/nope/abort") == (404, not_found("Run 'nope' not found.", runId="nope"))
        assert app.json("POST", "/echo/abort") == (422, problem(
            "VALIDATION_FAILED", 422, "Unprocessable Entity",
            "Please provide runid or run storage to abort request."))
        assert app.json("POST", f"/asking/abort?runId={run_id}") == (404, not_found(
            f"Run '{run_id}' not found.", runId=run_id, agentName="asking"))


def test_a_client_that_goes_away_aborts_its_run_unless_told_not_to(storage: Any) -> None:
    for abort_on_disconnect, status in ((True, "aborted"), (False, "completed")):
        with serving(storage, abort_on_disconnect=abort_on_disconnect, heartbeat=0.05) as app:
            reader = RawSse(app.port, "/echo/run", "POST", json.dumps(
                {"delay": 0.02, "messages": [{"role": "user", "content": "w " * 30}]}).encode())
            reader.read_until(b"TEXT_MESSAGE_START")
            run_id = reader.run_id()
            reader.drop()
            deadline = time.monotonic() + 20
            while storage.runs.get(run_id)["status"] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert storage.runs.get(run_id)["status"] == status


def test_another_scope_cannot_see_or_abort_a_run(storage: Any) -> None:
    with serving(storage) as app:
        _, result = app.json("POST", "/echo/run", {"threadId": "t1",
                                                   "messages": [{"role": "user", "content": "x"}]})
        run_id = result["runId"]
        for method, path in (("POST", f"/runs/{run_id}/abort"), ("GET", f"/runs/{run_id}/stream"),
                             ("POST", f"/echo/abort?runId={run_id}"),
                             ("GET", f"/echo/stream?runId={run_id}")):
            status, body = app.json(method, path, user="bob")
            assert status == 404 and body["detail"] == f"Run '{run_id}' not found.", (path, body)
            assert app.json(method, path, user=None)[0] == 401
            assert app.json(method, path, user="forged")[0] == 401


def test_runtime_reports_a_resumable_run_and_interrupts(storage: Any) -> None:
    with serving(storage) as app:
        storage.runs.track("r-live", "echo", thread_id="t1", scope="subject:alice").start()
        assert app.json("GET", "/echo/threads/t1/runtime") == (
            200, {"resumable": {"runId": "r-live", "afterSequence": 0}})
        storage.runs.finish("r-live", "completed")
        status, asked = app.json("POST", "/asking/run", {"threadId": "t2"})
        assert (status, asked["outcome"]) == (200, "interrupt")
        assert asked["interrupts"] == [{"id": "i1", "reason": "approval"}]
        assert app.json("GET", "/asking/threads/t2/runtime") == (200, {"interrupted": {
            "runId": asked["runId"], "interrupts": [{"id": "i1", "reason": "approval"}]}})
        before = counts(storage)
        for body, detail in (
                ({"threadId": "t2"}, "This thread has pending interrupts. Provide resume input to continue."),
                ({"threadId": "t2", "resume": [{"interruptId": "zz", "status": "resolved"}]},
                 "Resume entry 'zz' does not match an open interrupt."),
                ({"threadId": "t2", "resume": [], "messages": [{"role": "user", "content": "x"}]},
                 "Resume input must not include messages.")):
            assert app.json("POST", "/asking/run", body) == (422, problem(
                "VALIDATION_FAILED", 422, "Unprocessable Entity", detail))
        assert counts(storage) == before  # refused input writes nothing
        status, done = app.json("POST", "/asking/run", {"threadId": "t2", "resume": [
            {"interruptId": "i1", "status": "resolved", "payload": True}]})
        assert (status, done["outcome"]) == (200, "success")
        assert storage.runs.get(done["runId"])["config"]["resume"][0]["interruptId"] == "i1"


# -- bad input: the status and body Better Agent gives, and nothing written ---------------------------


def test_bad_input_is_refused_and_writes_nothing(storage: Any) -> None:
    with serving(storage, max_body_bytes=1000) as app:
        before = counts(storage)
        bad = [
            (app.json("POST", "/echo/run", raw=b'{"messages": ['), 400, "BAD_REQUEST"),
            (app.json("POST", "/echo/threads", raw=b"{nope"), 400, "BAD_REQUEST"),
            (app.json("POST", "/echo/run", {"messages": [{"content": "x" * 2000}]}), 413,
             "PAYLOAD_TOO_LARGE"),
            (app.json("POST", "/nobody/run", {}), 404, "NOT_FOUND"),
            (app.json("POST", "/remote/run", {}), 404, "NOT_FOUND"),
            (app.json("PUT", "/echo/threads", {}), 405, "METHOD_NOT_ALLOWED"),
            (app.json("GET", "/echo/run"), 405, "METHOD_NOT_ALLOWED"),
            (app.json("GET", "/echo/threads", user=None), 401, "UNAUTHORIZED"),
            (app.json("POST", "/echo/run", {}, user="forged"), 401, "UNAUTHORIZED"),
            (app.json("POST", "/echo/run", {"threadId": 7}), 422, "VALIDATION_FAILED"),
            (app.json("POST", "/echo/run", {"messages": "hi"}), 422, "VALIDATION_FAILED"),
            (app.json("POST", "/echo/run", {"threadId": "bad ", "messages": []}), 422, "VALIDATION_FAILED"),
            (app.json("GET", "/echo/threads/a/b"), 404, "NOT_FOUND"),
            (app.json("GET", "/nowhere"), 404, "NOT_FOUND"),
        ]
        for (status, body), expected_status, code in bad:
            assert (status, body["code"], body["status"]) == (expected_status, code, expected_status), body
            assert body["type"] == TYPE + code.lower().replace("_", "-")
        assert app.call("PUT", "/echo/threads")[1]["allow"] == "GET, POST"
        assert app.json("POST", "/nobody/run", {})[1] == not_found(
            "Agent 'nobody' not found.", agentName="nobody", availableAgents=list(AGENTS))
        assert counts(storage) == before


def test_ids_with_path_characters(storage: Any) -> None:
    with serving(storage) as app:
        status, result = app.json("POST", "/echo/run", {"threadId": "a/b?c#d é", "messages": [
            {"role": "user", "content": "x"}]})
        assert status == 200
        # The client sends encodeURIComponent(id): the segment is decoded whole (%2F stays in it).
        status, thread = app.json("GET", "/echo/threads/a%2Fb%3Fc%23d%20%C3%A9")
        assert status == 200 and thread["id"] == "a/b?c#d é"
        assert app.json("GET", "/echo/threads/..%2F..%2Fetc")[0] == 404
        assert app.json("GET", f"/runs/{result['runId']}%2F..%2Fx/stream")[0] == 404


def test_without_app_auth_agents_are_public_and_memory_routes_forbidden(storage: Any) -> None:
    with serving(storage, auth=None) as app:
        status, result = app.json("POST", "/echo/run", {"messages": [{"role": "user", "content": "x"}]},
                                  user=None)
        assert status == 200 and storage.runs.get(result["runId"])["status"] == "completed"
        forbidden = problem("FORBIDDEN", 403, "Forbidden",
                            "Remote memory requires app auth to be configured.")
        assert app.json("GET", "/echo/threads", user=None) == (403, forbidden)
        assert app.json("POST", "/echo/run", {"threadId": "t1"}, user=None) == (403, forbidden)
        assert app.call("GET", f"/runs/{result['runId']}/stream", user=None)[0] == 200
        # A run without a stream (here: one that does not exist) is a 200 with one `event: error` frame.
        status, headers, body = app.call("GET", "/runs/nope/stream", user=None)
        assert status == 200 and frames(body) == [{"event": "error", "data": json.dumps(
            not_found("Stream with runId 'nope' not found.", runId="nope"), separators=(",", ":"))}]


def test_custom_scope_and_agent_access(storage: Any) -> None:
    def team_scope(auth: Mapping[str, Any], environ: Dict[str, Any], agent: str) -> Optional[str]:
        return f"team:{environ['HTTP_X_TEAM']}" if environ.get("HTTP_X_TEAM") else None

    def admins_only(run: Any, request: RunRequest) -> None:
        raise Problem("UPSTREAM_FAILED", "the provider said no")

    admins_only.access = lambda auth, environ, name: bool(auth and auth["subject"] == "root")  # type: ignore
    with serving(storage, scope=team_scope, agents={"echo": echo, "admin": admins_only}) as app:
        _, thread = app.json("POST", "/echo/threads", {}, headers={"X-Team": "red"})
        assert storage.memory.threads.get(thread["id"])["scope"] == "team:red"
        red = {"X-Team": "red"}
        assert app.json("GET", f"/echo/threads/{thread['id']}", user="bob", headers=red)[0] == 200
        assert app.json("GET", f"/echo/threads/{thread['id']}", headers={"X-Team": "blue"})[0] == 404
        assert app.json("GET", "/echo/threads") == (403, problem(
            "FORBIDDEN", 403, "Forbidden", "Agent auth scope could not be resolved for this request."))
        assert app.json("POST", "/admin/run", {})[0] == 403
        assert app.json("POST", "/admin/run", {}, user=None)[0] == 401
        status, body = app.json("POST", "/admin/run", {}, user="root")
        assert (status, body["code"], body["retryable"]) == (502, "UPSTREAM_FAILED", True)


def test_an_aborted_json_run_answers_499(storage: Any) -> None:
    def stops(run: Any, request: RunRequest) -> None:
        raise RunAborted("Run aborted between steps.")

    with serving(storage, agents={"stops": stops}) as app:
        assert app.json("POST", "/stops/run", {}) == (499, problem(
            "ABORTED", 499, "Client Closed Request", "Run aborted between steps."))


def test_a_database_that_cannot_serve_now_is_a_503() -> None:
    for exc in (peewee.OperationalError("remaining connection slots are reserved"),
                PoolExhaustedError("every pooled connection stayed busy")):
        answer = problem_of(exc).details()
        assert (answer["status"], answer["code"], answer["retryable"]) == (503, "SERVICE_UNAVAILABLE", True)
        assert "remaining" not in answer["detail"]  # the driver's words stay in the log
    assert problem_of(RuntimeError("boom")).details()["status"] == 500


def test_a_streamed_run_no_worker_takes_is_failed_not_left_running(storage: Any) -> None:
    workers = ThreadPoolExecutor(1)
    workers.shutdown()
    with serving(storage, executor=workers) as app:
        status, body = app.json("POST", "/echo/run", {}, headers={"Accept": "text/event-stream"})
    assert (status, body["code"]) == (500, "INTERNAL")
    assert [r["status"] for r in storage.list("runs", {})["items"]] == ["failed"]


def test_thread_state_goes_from_run_to_run(storage: Any) -> None:
    seen: List[Any] = []

    def counter(run: Any, request: RunRequest) -> None:
        seen.append(request.state)
        run.set_state({"count": (request.state or {}).get("count", 0) + 1})

    with serving(storage, agents={"counter": counter}) as app:
        assert app.json("POST", "/counter/run", {"threadId": "t"})[1]["state"] == {"count": 1}
        assert app.json("POST", "/counter/run", {"threadId": "t"})[1]["state"] == {"count": 2}
        _, answer = app.json("POST", "/counter/run", {"threadId": "t", "state": {"count": 10}})
        assert answer["state"] == {"count": 11}
        assert app.json("GET", "/counter/threads/t")[1]["state"] == {"count": 11}
        body = app.call("POST", "/counter/run", {"threadId": "t"}, headers={"Accept": "text/event-stream"})[2]
        assert events(body)[0]["input"]["state"] == {"count": 11}  # RUN_STARTED's input, as Better Agent's
    assert seen == [None, {"count": 1}, {"count": 10}, {"count": 11}]


def test_a_storage_without_memory_or_streams_answers_as_better_agent(database: peewee.Database) -> None:
    create_tables(database)
    runs_only = peewee_storage(database, domains=("runs", "streams"))
    with serving(runs_only) as app:
        no_memory = not_found("Agent 'echo' does not have memory configured.")
        assert app.json("GET", "/echo/threads") == (404, no_memory)
        status, answer = app.json("POST", "/echo/run", {"threadId": "t1", "messages": [
            {"role": "user", "content": "no memory here"}]})
        assert (status, answer["outcome"]) == (200, "success")  # the run, without a thread or messages
        assert runs_only.runs.get(answer["runId"])["threadId"] == "t1"
        assert app.json("POST", "/echo/abort")[0] == 422  # no running run in alice's default scope
    memory_only = peewee_storage(database, domains=("memory",))
    with serving(memory_only) as app:
        assert app.json("GET", "/echo/threads") == (200, {"threads": []})
        status, answer = app.json("POST", "/echo/run", {}, headers={"Accept": "text/event-stream"})
        assert (status, answer["code"]) == (422, "VALIDATION_FAILED")
        status, answer = app.json("POST", "/runs/r1/abort")
        assert (status, answer["code"]) == (422, "VALIDATION_FAILED") and "runs" in answer["detail"]


def test_the_stream_of_a_run_whose_worker_died_ends_with_a_stale_error_frame(storage: Any) -> None:
    dead_run(storage, "dead", "echo", [{"type": "RUN_STARTED"}, {"type": "TEXT_MESSAGE_START"}])
    storage.database.close()
    with serving(storage) as app:
        status, headers, body = app.call("GET", "/runs/dead/stream")
    assert status == 200 and [f.get("id") or f.get("event") for f in frames(body)] == ["1", "2", "error"]
    problem = json.loads(frames(body)[-1]["data"])
    assert (problem["code"], problem["status"], problem["retryable"]) == ("STALE_RUN", 503, True)
    assert problem["type"] == TYPE + "stale-run" and problem["context"] == {"runId": "dead", "lastSeq": 2}


def test_a_json_run_ended_by_someone_else_answers_how_it_ended(storage: Any) -> None:
    def reaped(run: Any, request: RunRequest) -> None:
        storage.runs.finish(run.run_id, "failed", {"type": "RUN_ERROR", "message": "worker presumed dead",
                                                   "code": "STALE_RUN"})  # as reap_stale would
        run.check_abort()  # RunEndedElsewhere: the block writes nothing more
        raise AssertionError("not reached")

    with serving(storage, agents={"reaped": reaped}) as app:
        status, body = app.json("POST", "/reaped/run", {})
    assert (status, body["code"], body["detail"]) == (503, "STALE_RUN", "worker presumed dead")
    assert [r["status"] for r in storage.list("runs", {})["items"]] == ["failed"]


def test_last_event_id_and_limits_are_read_as_javascripts_number_reads_them() -> None:
    cases = {None: 0, "": 0, " 5 ": 5, "1e2": 100, "1.": 1, ".5": 0, "2.7": 2, "0x1F": 31, "0B11": 3,
             "-3": 0, "-0x10": 0, "+0x10": 0, "١٢": 0, "Infinity": 0, "nan": 0, "1_0": 0, "0x1_F": 0,
             "abc": 0, "1e999": 0}
    assert {text: after_seq(text) for text in cases} == cases
    assert [limit_of(t) for t in (None, "", "0", "-1", "0.5", "2.9", "x", "1e99")] == \
        [None, None, None, None, 0, 2, None, 2 ** 31 - 1]
