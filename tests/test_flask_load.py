"""The Flask example under load: a real threaded HTTP server, tens of clients at a time, every answer checked.

The app is served by werkzeug's threaded server on 127.0.0.1 (one thread per request) over a
pooled database, as the README recommends; its Better Agent routes (`wsgi_app`, mounted under
/api/agents) execute the chat runs the clients start, streamed ones on its worker pool. Clients
list and read threads and messages, replay a run, start runs and abort some of them (some while
they still wait for a worker), and send requests that are refused.
"""
from __future__ import annotations

import http.client
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from werkzeug.serving import make_server

from tests.test_examples import load_flask_example

CLIENTS = 24  # requests in flight at once: more than the pool's 20 connections
THREADS = 12  # seeded "support" threads the readers check
MESSAGES = 6
CHATS = 60  # runs started over HTTP
ABORT_EVERY = 3  # every third chat is aborted by its client right after it started
WORDS = 25  # words of each chat message: the demo agent's reply has 28 -> 32 events per run


def request(port: int, method: str, path: str, body: Optional[Any] = None, cookie: str = "",
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
    """(status, body: parsed when JSON, else bytes) of one HTTP request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = None if body is None else json.dumps(body)
        sent = {"Content-Type": "application/json"} if body is not None else {}
        sent.update({"Cookie": cookie} if cookie else {}, **(headers or {}))
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        data = response.read()
        kind = response.getheader("Content-Type", "")
        if kind.startswith(("application/json", "application/problem+json")):
            return response.status, json.loads(data)
        return response.status, data
    finally:
        conn.close()


def login(port: int, user: str) -> str:
    """The session cookie of `user` (the example's demo login)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/login", body=json.dumps({"user": user}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return str(response.getheader("Set-Cookie")).split(";", 1)[0]


def sse_events(body: bytes) -> List[Dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: ")]


@pytest.fixture
def served(database_url: str) -> Iterator[Tuple[Any, int]]:
    app = load_flask_example().create_app(database_url, AGENT_WORKERS=4, AGENT_WORD_SECONDS=0.002)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    try:
        yield app, server.server_port
    finally:
        server.shutdown()
        serving.join(timeout=30)
        server.server_close()
        app.extensions["agent_workers"].shutdown(wait=True)
        app.extensions["agent_storage"].database.close_all()


def seed(storage: Any) -> Dict[str, Any]:
    threads = {}
    for i in range(THREADS):
        tid = f"support-{i:02d}"
        threads[tid] = {"id": tid, "agentName": "demo", "scope": "subject:alice", "title": f"Thread {i}",
                        "createdAt": 1_000 + i, "updatedAt": 2_000 + (i * 7) % THREADS}
        storage.memory.threads.set(tid, threads[tid])
        storage.memory.messages.append(tid, [{"id": f"{tid}-m{k}", "role": "user", "content": f"{tid} {k}"}
                                             for k in range(MESSAGES)])
    messages = {tid: storage.memory.messages.list(tid) for tid in threads}
    with storage.runs.track("done-run", "demo", thread_id="support-00") as run:
        run.emit({"type": "CUSTOM", "name": "seed"})
    # The thread list's expected order: the run bumped support-00, the rest by updatedAt.
    order = [t["id"] for t in storage.memory.threads.list(agent_name="demo")]
    shown = {tid: {k: v for k, v in storage.memory.threads.get(tid).items() if k != "scope"}
             for tid in threads}
    query = {"where": {"runId": "done-run"}, "orderBy": {"seq": "asc"}}
    events = storage.list("streamEvents", query)["items"]
    return {"threads": shown, "messages": messages, "order": order, "events": [e["event"] for e in events]}


def test_the_flask_example_answers_every_request_under_load(served: Tuple[Any, int]) -> None:
    app, port = served
    storage = app.extensions["agent_storage"]
    expected = seed(storage)
    cookie, chatter = login(port, "alice"), login(port, "bob")  # bob's chats stay out of alice's lists
    rng = random.Random(14)
    words = " ".join(f"w{k}" for k in range(WORDS))
    failures: List[str] = []
    started: Dict[int, str] = {}
    api = "/api/agents"

    def check(what: str, ok: bool, got: Any) -> None:
        if not ok:
            failures.append(f"{what}: {str(got)[:300]}")

    def list_threads(limit: int) -> None:
        status, body = request(port, "GET", f"{api}/demo/threads?limit={limit}", cookie=cookie)
        check(f"list {limit}",
              status == 200 and [t["id"] for t in body["threads"]] == expected["order"][:limit]
              and all(t == expected["threads"][t["id"]] for t in body["threads"]), (status, body))

    def show_thread(tid: str, limit: int) -> None:
        status, body = request(port, "GET", f"{api}/demo/threads/{tid}", cookie=cookie)
        check(f"show {tid}", status == 200 and body == expected["threads"][tid], (status, body))
        status, body = request(port, "GET", f"{api}/demo/threads/{tid}/messages?limit={limit}", cookie=cookie)
        check(f"messages {tid}", status == 200 and body["messages"] == expected["messages"][tid][-limit:],
              (status, body))

    def replay_run() -> None:
        status, body = request(port, "GET", f"{api}/runs/done-run/stream", cookie=cookie)
        events = sse_events(body) if status == 200 else body
        check("replay", status == 200 and [{k: v for k, v in e.items() if k != "seq"} for e in events]
              == expected["events"] and [e["seq"] for e in events] == [1, 2, 3], (status, body))

    def chat(n: int) -> None:
        question = {"threadId": f"chat-{n % 10}", "messages": [{"role": "user", "content": f"{n} {words}"}]}
        if n % 2 == 0 and n % ABORT_EVERY != 0:  # half of the runs answered as JSON, the rest streamed
            status, body = request(port, "POST", f"{api}/demo/run", question, cookie=chatter)
            check(f"chat {n}", status == 200 and body["outcome"] == "success", (status, body))
            if status == 200:
                started[n] = body["runId"]
            return
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", f"{api}/demo/run", body=json.dumps(question), headers={
            "Content-Type": "application/json", "Accept": "text/event-stream", "Cookie": chatter})
        response = conn.getresponse()
        run_id = response.getheader("X-Run-Id")
        check(f"chat {n}", response.status == 200 and run_id is not None, response.status)
        if run_id is None:
            return
        started[n] = run_id
        if n % ABORT_EVERY == 0:  # asked to stop right away: maybe still queued, maybe mid-reply
            for _ in range(2):  # a second ask changes nothing, and is answered the same
                status, answer = request(port, "POST", f"{api}/runs/{run_id}/abort", cookie=chatter)
                check(f"abort {n}", status == 204, (status, answer))
        events = sse_events(response.read())
        conn.close()
        check(f"stream {n}", events[0]["type"] == "RUN_STARTED"
              and events[-1]["type"] in ("RUN_FINISHED", "RUN_ERROR"), events)

    def refused() -> None:
        for method, path, body, code, who in (
                ("GET", f"{api}/nobody/threads", None, 404, cookie),
                ("GET", f"{api}/demo/threads/nope", None, 404, cookie),
                ("POST", f"{api}/demo/run", {"threadId": 5}, 422, cookie),
                ("POST", f"{api}/runs/nope/abort", None, 404, cookie),
                ("GET", f"{api}/demo/threads", None, 401, ""),
                ("DELETE", f"{api}/demo/threads", None, 405, cookie)):
            status, answer = request(port, method, path, body, cookie=who)
            check(f"{method} {path}", status == code and isinstance(answer, dict)
                  and answer.get("status") == code and answer.get("detail"), (status, answer))

    jobs: List[Any] = []
    jobs += [lambda k=k: list_threads(k) for k in rng.choices(range(1, THREADS + 1), k=120)]
    jobs += [lambda t=t, k=k: show_thread(t, k) for t, k in
             zip(rng.choices(sorted(expected["threads"]), k=60), rng.choices(range(1, MESSAGES + 1), k=60))]
    jobs += [replay_run] * 40
    jobs += [lambda n=n: chat(n) for n in range(CHATS)]
    jobs += [refused] * 10  # 6 requests each
    rng.shuffle(jobs)
    with ThreadPoolExecutor(CLIENTS) as clients:
        for future in [clients.submit(job) for job in jobs]:
            future.result()
    assert failures == []
    assert len(started) == CHATS

    # Every run ends, as its client asked, with the records Better Agent's own runtime writes.
    assert storage.runs.running("demo") is None
    queued = 0
    for n, run_id in started.items():
        run = storage.runs.get(run_id)
        events = [e["event"] for e in storage.list("streamEvents", {"where": {"runId": run_id},
                                                                    "orderBy": {"seq": "asc"}})["items"]]
        assert events[0]["type"] == "RUN_STARTED" and events[-1] == run["finalEvent"]
        assert storage.streams.get(run_id)["status"] == "closed"
        mine = [m for m in storage.memory.messages.list(f"chat-{n % 10}") if m.get("runId") == run_id]
        types = [e["type"] for e in events]
        if run["status"] == "aborted":
            assert n % ABORT_EVERY == 0 and run["finalEvent"]["code"] == "ABORTED"
            said = [e["delta"].strip() for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
            if types == ["RUN_STARTED", "RUN_ERROR"]:
                queued += 1  # aborted while it waited for a worker: no message was started
            # A started message is always ended, and what was said before the abort is kept.
            assert types.count("TEXT_MESSAGE_START") == types.count("TEXT_MESSAGE_END") <= 1, types
            assert [(m["role"], m["content"]) for m in mine][1:] == \
                ([("assistant", " ".join(said))] if said else [])  # what was said is kept
        else:
            assert run["status"] == "completed", run
            reply = f"You said: {n} {words}"
            assert len(events) == len(reply.split(" ")) + 4 and events[-1]["type"] == "RUN_FINISHED"
            text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
            assert text == reply + " "
            assert [m["role"] for m in mine] == ["user", "assistant"]
    statuses = [storage.runs.get(r)["status"] for r in started.values()]
    assert statuses.count("completed") >= CHATS - CHATS // ABORT_EVERY  # only the asked ones stop
    # Runs wait in the worker pool's queue (4 workers, 60 chats): some were aborted while queued.
    assert queued >= 1, f"none of the {statuses.count('aborted')} aborted runs was aborted while queued"
