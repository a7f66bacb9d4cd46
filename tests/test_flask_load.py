"""The Flask example under load: a real threaded HTTP server, tens of clients at a time, every answer checked.

The app is served by werkzeug's threaded server on 127.0.0.1 (one thread per request) over a
pooled database, as the README recommends, while its worker pool executes the chat runs the
clients start; clients list and read threads, read runs, start runs and abort some of them.
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
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


def request(port: int, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Tuple[int, Any]:
    """(status, body: parsed when JSON, else text) of one HTTP request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data.decode()
    finally:
        conn.close()


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
        threads[tid] = {"id": tid, "agentName": "support", "title": f"Thread {i}",
                        "createdAt": 1_000 + i, "updatedAt": 2_000 + (i * 7) % THREADS}
        storage.memory.threads.set(tid, threads[tid])
        storage.memory.messages.append(tid, [{"id": f"{tid}-m{k}", "role": "user", "content": f"{tid} {k}"}
                                             for k in range(MESSAGES)])
    messages = {tid: storage.memory.messages.list(tid) for tid in threads}
    with storage.runs.track("done-run", "support", thread_id="support-00") as run:
        run.emit({"type": "CUSTOM", "name": "seed"})
    # The thread list's expected order: the run bumped support-00, the rest by updatedAt.
    order = [t["id"] for t in storage.memory.threads.list(agent_name="support")]
    return {"threads": {tid: storage.memory.threads.get(tid) for tid in threads}, "messages": messages,
            "order": order, "run": storage.runs.get("done-run")}


def test_the_flask_example_answers_every_request_under_load(served: Tuple[Any, int]) -> None:
    app, port = served
    storage = app.extensions["agent_storage"]
    expected = seed(storage)
    rng = random.Random(14)
    words = " ".join(f"w{k}" for k in range(WORDS))
    failures: List[str] = []
    started: Dict[int, str] = {}
    aborts: Dict[str, List[str]] = {}

    def check(what: str, ok: bool, got: Any) -> None:
        if not ok:
            failures.append(f"{what}: {str(got)[:300]}")

    def list_threads(limit: int) -> None:
        status, body = request(port, "GET", f"/threads?agent=support&limit={limit}")
        check(f"list {limit}",
              status == 200 and [t["id"] for t in body["threads"]] == expected["order"][:limit]
              and all(t == expected["threads"][t["id"]] for t in body["threads"]), (status, body))

    def show_thread(tid: str, limit: int) -> None:
        status, body = request(port, "GET", f"/threads/{tid}?limit={limit}")
        check(f"show {tid}", status == 200 and body["thread"] == expected["threads"][tid]
              and body["messages"] == expected["messages"][tid][-limit:], (status, body))

    def show_run() -> None:
        status, body = request(port, "GET", "/runs/done-run")
        check("run", status == 200 and body == expected["run"], (status, body))

    def chat(n: int) -> None:
        status, body = request(port, "POST", f"/threads/chat-{n % 10}/runs", {"message": f"{n} {words}"})
        check(f"chat {n}", status == 202 and body["runId"].startswith("run-"), (status, body))
        if status != 202:
            return
        started[n] = body["runId"]
        if n % ABORT_EVERY == 0:
            for _ in range(2):  # the second ask is answered already_requested or not_running
                status, answer = request(port, "POST", f"/runs/{body['runId']}/abort")
                check(f"abort {n}", status == 200 and answer["requested"] == (answer["abort"] == "requested"),
                      answer)
                if status == 200:
                    aborts.setdefault(body["runId"], []).append(answer["abort"])

    def refused() -> None:
        for method, path, body, code in (("GET", "/runs/nope", None, 404),
                                         ("GET", "/threads?limit=-1", None, 400),
                                         ("GET", "/threads/nope", None, 404),
                                         ("POST", "/threads/x/runs", {"message": ""}, 400),
                                         ("POST", "/runs/nope/abort", None, 404)):
            status, answer = request(port, method, path, body)
            check(f"{method} {path}", status == code and isinstance(answer, dict) and "error" in answer,
                  (status, answer))

    jobs: List[Any] = []
    jobs += [lambda k=k: list_threads(k) for k in rng.choices(range(1, THREADS + 1), k=120)]
    jobs += [lambda t=t, k=k: show_thread(t, k) for t, k in
             zip(rng.choices(sorted(expected["threads"]), k=120), rng.choices(range(1, MESSAGES + 1), k=120))]
    jobs += [show_run] * 40
    jobs += [lambda n=n: chat(n) for n in range(CHATS)]
    jobs += [refused] * 10  # 5 requests each
    rng.shuffle(jobs)
    with ThreadPoolExecutor(CLIENTS) as clients:
        for future in [clients.submit(job) for job in jobs]:
            future.result()
    assert failures == []
    assert len(started) == CHATS

    # Every run ends, as its client asked, with the records Better Agent's own runtime writes.
    deadline = time.monotonic() + 300
    while storage.runs.running("demo-agent") is not None:
        assert time.monotonic() < deadline, "runs still running"
        time.sleep(0.05)
    queued_aborts = 0
    for n, run_id in started.items():
        run = storage.runs.get(run_id)
        events = [e["event"] for e in storage.list("streamEvents", {"where": {"runId": run_id},
                                                                    "orderBy": {"seq": "asc"}})["items"]]
        answers = aborts.get(run_id, [])
        assert answers.count("requested") <= 1 and set(answers) <= {"requested", "already_requested",
                                                                    "not_running"}
        assert events[0]["type"] == "RUN_STARTED" and events[-1] == run["finalEvent"]
        assert storage.streams.get(run_id)["status"] == "closed"
        mine = [m for m in storage.memory.messages.list(f"chat-{n % 10}") if m.get("runId") == run_id]
        if run["status"] == "aborted":
            assert "requested" in answers and run["finalEvent"]["code"] == "ABORTED"
            types = [e["type"] for e in events]
            if types == ["RUN_STARTED", "RUN_ERROR"]:
                queued_aborts += 1  # aborted before its worker began: no message was started
            # A started message is always ended, and what was said before the abort is kept.
            assert types.count("TEXT_MESSAGE_START") == types.count("TEXT_MESSAGE_END") <= 1, types
            said = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
            assert [(m["role"], m["content"]) for m in mine] == [("user", f"{n} {words}")] + (
                [("assistant", said.rstrip(" "))] if said else [])
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
    assert queued_aborts >= 1
