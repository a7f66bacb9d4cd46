"""`better_agent_peewee.server.wsgi_app` read the way Better Agent's client reads it.

tests/js/sse_reader.mjs follows the framing rules of Better Agent's client parser (`parseSse`
in packages/client/src/core/sse.ts, written from its rules, not copied); Node runs it (its
built-in fetch and streams, no packages) against the app served on 127.0.0.1 by a threaded
werkzeug server. A headless Chromium page (selenium, as in tests/test_sse.py) imports the same
reader, streams a run, drops the connection and resumes it. What is expected comes from the
TypeScript server's behaviour (packages/core/src/app/handler.ts): live frames carry no `id:`,
replayed frames carry `id: <seq>` and the event's `seq`, the body simply ends with the run.
Every test runs on the three dialects; none asserts a duration.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import pytest
from werkzeug.serving import make_server

from better_agent_peewee import create_tables, open_database, peewee_storage
from better_agent_peewee.server import wsgi_app

ROOT = Path(__file__).resolve().parent.parent
READER = ROOT / "tests" / "js" / "sse_reader.mjs"
ALICE = {"authorization": "Bearer alice"}
SSE = {**ALICE, "accept": "text/event-stream", "content-type": "application/json"}



@pytest.fixture(autouse=True)
def _node() -> None:
    assert shutil.which("node"), "node is not installed (scripts/test.sh installs Debian's nodejs)"


def auth(environ: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    header = environ.get("HTTP_AUTHORIZATION", "")
    return {"subject": header[len("Bearer "):]} if header.startswith("Bearer ") and len(header) > 7 else None


def chunked_agent(chunks: List[str], delay: float = 0.0,
                  hold: Optional[threading.Event] = None) -> Callable[[Any, Any], Dict[str, Any]]:
    """What Better Agent's runtime emits for one model step that writes `chunks`; with `hold`,
    the step waits after its second chunk until `hold` is set (at most a minute)."""
    def agent(run: Any, request: Any) -> Dict[str, Any]:
        message_id = f"msg-{run.run_id}"
        run.emit({"type": "STEP_STARTED", "stepName": "model:1"})
        run.emit({"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"})
        for i, chunk in enumerate(chunks):
            if hold is not None and i == 2:
                hold.wait(60)
            time.sleep(delay)
            run.check_abort()
            run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": chunk})
        run.emit({"type": "TEXT_MESSAGE_END", "messageId": message_id})
        if request.thread_id is not None:
            run.append_messages([{"id": message_id, "role": "assistant", "content": "".join(chunks)}])
        run.emit({"type": "STEP_FINISHED", "stepName": "model:1"})
        return {"finishReason": "stop", "usage": {"outputTokens": len(chunks)}, "stepCount": 1}
    return agent


def waiting_agent(run: Any, request: Any) -> Dict[str, Any]:
    """Starts a message, then waits (at most a minute) for its abort."""
    run.emit({"type": "STEP_STARTED", "stepName": "model:1"})
    run.emit({"type": "TEXT_MESSAGE_START", "messageId": f"msg-{run.run_id}", "role": "assistant"})
    for _ in range(1200):
        run.check_abort()
        time.sleep(0.05)
    return {"finishReason": "length", "stepCount": 1}


#: Set by the test that reads `held` once it has seen that run still running (cleared before).
HELD = threading.Event()
AGENTS = {"echo": chunked_agent(["Hello", ", ", "world"]),
          "slow": chunked_agent([f"w{i} " for i in range(12)], delay=0.25),
          "held": chunked_agent([f"w{i} " for i in range(12)], delay=0.25, hold=HELD),
          "waiting": waiting_agent}
#: The types of a whole run of `echo` / `slow`, in order.
ECHO_TYPES = ["RUN_STARTED", "STEP_STARTED", "TEXT_MESSAGE_START"] + ["TEXT_MESSAGE_CONTENT"] * 3 + \
    ["TEXT_MESSAGE_END", "STEP_FINISHED", "RUN_FINISHED"]
SLOW_COUNT = 3 + 12 + 3


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` on a threaded werkzeug server on a free 127.0.0.1 port: its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(30)


@pytest.fixture
def storage(database_url: str) -> Iterator[Any]:
    database = open_database(database_url, pooled=True)
    create_tables(database)
    yield peewee_storage(database)
    database.close_all()


@pytest.fixture
def base(storage: Any) -> Iterator[str]:
    with serving(wsgi_app(storage, agents=AGENTS, auth=auth, abort_on_disconnect=False)) as url:
        yield url


def read(url: str, **request: Any) -> List[Dict[str, Any]]:
    """What the reader makes of one request: [{status, headers}, {event}|{error}|{body}..., {end}]."""
    proc = subprocess.run(["node", str(READER), json.dumps({"url": url, **request})],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert items and "status" in items[0] and "end" in items[-1], proc.stdout[-2000:]
    return items


def events(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [item["event"] for item in items if "event" in item]


def run_body(**body: Any) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **body})


def test_a_streamed_run_reads_as_the_client_reads_it(base: str) -> None:
    items = read(f"{base}/echo/run", method="POST", headers=SSE, body=run_body(threadId="t1"))
    head = items[0]
    assert head["status"] == 200
    assert head["headers"]["content-type"] == "text/event-stream"
    assert head["headers"]["cache-control"] == "no-cache, no-transform"
    assert head["headers"]["x-accel-buffering"] == "no"
    got = events(items)
    assert [e["type"] for e in got] == ECHO_TYPES
    run_id = head["headers"]["x-run-id"]
    assert got[0]["runId"] == run_id and got[0]["threadId"] == "t1"
    assert got[0]["input"]["messages"][-1]["content"] == "Hi" and got[0]["input"]["messages"][-1]["id"]
    assert all("seq" not in e for e in got)  # live frames carry no id, as the TypeScript server's
    assert "".join(e["delta"] for e in got if e["type"] == "TEXT_MESSAGE_CONTENT") == "Hello, world"
    assert got[-1]["outcome"] == "success"
    assert got[-1]["result"] == {"finishReason": "stop", "usage": {"outputTokens": 3}, "stepCount": 1}
    assert items[-1] == {"end": "closed"}  # the body simply ends with the run: no `end` event

    replay = read(f"{base}/runs/{run_id}/stream", headers={**ALICE, "last-event-id": "3"})
    assert replay[0]["status"] == 200 and replay[0]["headers"]["x-run-id"] == run_id
    assert [e["seq"] for e in events(replay)] == list(range(4, len(ECHO_TYPES) + 1))
    assert [e["type"] for e in events(replay)] == ECHO_TYPES[3:]
    assert [{k: v for k, v in e.items() if k != "seq"} for e in events(replay)] == got[3:]
    assert replay[-1] == {"end": "closed"}


def test_a_dropped_stream_resumes_with_no_gap_and_no_duplicate(base: str) -> None:
    # The run holds after its fifth event until the runtime route has been read: the run must still
    # be running then, however slowly node starts on a loaded machine.
    HELD.clear()
    try:
        first = read(f"{base}/held/run", method="POST", headers=SSE, body=run_body(threadId="t2"),
                     dropAfter=4)
        assert first[-1] == {"end": "dropped"} and len(events(first)) == 4
        run_id = first[0]["headers"]["x-run-id"]
        runtime = read(f"{base}/held/threads/t2/runtime", headers=ALICE)
        assert json.loads(runtime[1]["body"]) == {"resumable": {"runId": run_id, "afterSequence": 0}}
    finally:
        HELD.set()
    # Agent-scoped, dropped again after three more; then by run id to the end.
    second = read(f"{base}/held/stream?runId={run_id}", headers={**ALICE, "last-event-id": "4"}, dropAfter=3)
    assert [e["seq"] for e in events(second)] == [5, 6, 7] and second[-1] == {"end": "dropped"}
    third = read(f"{base}/runs/{run_id}/stream", headers={**ALICE, "last-event-id": "7"})
    assert third[-1] == {"end": "closed"}
    seqs = [1, 2, 3, 4] + [e["seq"] for e in events(second) + events(third)]
    assert seqs == list(range(1, SLOW_COUNT + 1))
    assert events(third)[-1]["type"] == "RUN_FINISHED"
    whole = read(f"{base}/runs/{run_id}/stream", headers=ALICE)  # from the start: the same events
    assert [e["seq"] for e in events(whole)] == seqs
    assert [e["type"] for e in events(whole)[:4]] == [e["type"] for e in events(first)]


def test_an_abort_ends_the_stream_with_run_error(base: str) -> None:
    started = read(f"{base}/waiting/run", method="POST", headers=SSE, body=run_body(threadId="t3"),
                   dropAfter=3)
    run_id = started[0]["headers"]["x-run-id"]
    aborted = read(f"{base}/waiting/abort?runId={run_id}", method="POST", headers=ALICE)
    assert aborted[0]["status"] == 204 and aborted[1:] == [{"body": ""}, {"end": "closed"}]
    rest = events(read(f"{base}/runs/{run_id}/stream", headers=ALICE))
    assert [e["type"] for e in rest] == ["RUN_STARTED", "STEP_STARTED", "TEXT_MESSAGE_START", "RUN_ERROR"]
    assert rest[-1]["code"] == "ABORTED" and [e["seq"] for e in rest] == [1, 2, 3, 4]


def test_errors_are_problem_details_the_client_can_read(base: str) -> None:
    bob = read(f"{base}/runs/nope/stream", headers={"authorization": "Bearer bob"})
    assert bob[0]["status"] == 404 and bob[0]["headers"]["content-type"] == "application/problem+json"
    problem = json.loads(bob[1]["body"])
    assert problem["code"] == "NOT_FOUND" and problem["status"] == 404 and problem["detail"]
    anonymous = read(f"{base}/echo/run", method="POST", headers={"accept": "text/event-stream"}, body="{}")
    assert anonymous[0]["status"] == 401 and json.loads(anonymous[1]["body"])["code"] == "UNAUTHORIZED"


# -- the reader itself, on bytes chosen to be awkward --------------------------------------------

AWKWARD = [  # (bytes the server writes, one write each)
    b": heartbeat\n\n",
    b"id: 7\r\ndata: {\"type\":\"A\",", b"\"n\":1}\r\n\r\n",      # CRLF, split inside the JSON
    b"data: {\"type\":\"B\",\n", b"data: \"s\":\"\xc3", b"\xa9\"}\n\n",  # two data lines, UTF-8 split
    b"id: x\ndata: {\"type\":\"C\"}\n\n",                         # a non-numeric id: no seq
    b"retry: 10\nevent: other\ndata: {\"type\":\"D\"}\n\n",       # unknown fields ignored
    b"id: 9\n\n",                                                 # no data: dropped
    b"event: error\ndata: {\"type\":\"about:blank\",\"status\":500,"
    b"\"code\":\"INTERNAL\",\"detail\":\"x\"}\n\n",
    b"data: {\"type\":\"NEVER\"}\n\n",                             # after the error: not read
]


def awkward_app(writes: List[bytes]) -> Callable[..., Iterable[bytes]]:
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        for chunk in writes:
            time.sleep(0.01)
            yield chunk
    return app


def test_the_reader_follows_the_clients_framing_rules() -> None:
    with serving(awkward_app(AWKWARD)) as url:
        items = read(url)
    assert items[1:] == [
        {"event": {"type": "A", "n": 1, "seq": 7}},
        {"event": {"type": "B", "s": "\u00e9"}},
        {"event": {"type": "C"}},
        {"event": {"type": "D"}},
        {"error": {"type": "about:blank", "status": 500, "code": "INTERNAL", "detail": "x"}},
        {"end": "error"},
    ]
    # The end of the body ends a frame that lacks its blank line; a line that lacks its "\n" is lost.
    with serving(awkward_app([b"data: {\"type\":\"LAST\"}\n", b"data: {\"more\":1}"])) as url:
        assert read(url)[1:] == [{"event": {"type": "LAST"}}, {"end": "closed"}]


# -- a headless Chromium page ------------------------------------------------------------------

PAGE = """<!doctype html><meta charset="utf-8"><title>run</title>
<ol id="events"></ol><p id="status">starting</p>
<script type="module">
import { createFrameReader } from "/sse_reader.mjs";
const list = document.getElementById("events"), status = document.getElementById("status");
const auth = { authorization: "Bearer alice" };
let count = 0;
function show(event) {
  count += 1;
  const li = document.createElement("li");
  li.dataset.seq = String(event.seq ?? count);  // live frames carry no seq: count them
  li.textContent = event.type + (event.delta ? " " + event.delta : "");
  list.append(li);
}
async function follow(response, stopAfter, controller) {
  const reader = createFrameReader();
  const body = response.body.getReader();
  for (;;) {
    const { done, value } = await body.read();
    const items = done ? reader.end() : reader.push(value);
    for (const item of items) {
      if (item.error) throw new Error(item.error.detail);
      show(item.event);
      if (stopAfter && count >= stopAfter) { controller.abort(); return; }
    }
    if (done) return;
  }
}
try {
  const first = new AbortController();
  const response = await fetch("/slow/run", { method: "POST", signal: first.signal,
    headers: { ...auth, accept: "text/event-stream", "content-type": "application/json" },
    body: JSON.stringify({ threadId: "page", messages: [{ role: "user", content: "Hi" }] }) });
  const runId = response.headers.get("x-run-id");
  await follow(response, 5, first).catch((e) => { if (!first.signal.aborted) throw e; });
  status.textContent = "dropped";
  const again = await fetch(`/runs/${runId}/stream`,
    { headers: { ...auth, "last-event-id": String(count) } });
  await follow(again);
  status.textContent = "done";
} catch (error) {
  status.textContent = "failed: " + error;
}
</script>"""


def page_and_api(api: Any) -> Callable[..., Iterable[bytes]]:
    """The page and the reader module at / and /sse_reader.mjs; everything else to `api`."""
    files = {"/": (PAGE.encode(), "text/html"), "/sse_reader.mjs": (READER.read_bytes(), "text/javascript")}

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO") in files:
            body, kind = files[environ["PATH_INFO"]]
            start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
            return [body]
        result: Iterable[bytes] = api(environ, start_response)
        return result
    return app


def test_a_browser_page_streams_a_run_and_resumes_it(storage: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_sse import chromium

    api = wsgi_app(storage, agents=AGENTS, auth=auth, abort_on_disconnect=False)
    with serving(page_and_api(api)) as url, chromium(tmp_path / "profile") as browser:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda _: status() in ("done",) or status().startswith("failed"))
        assert status() == "done"
        items = browser.find_elements(By.CSS_SELECTOR, "#events li")
        shown: List[Tuple[Optional[str], str]] = [(li.get_attribute("data-seq"), li.text) for li in items]
    assert [seq for seq, _ in shown] == [str(i) for i in range(1, SLOW_COUNT + 1)]  # no gap, no duplicate
    assert shown[0][1] == "RUN_STARTED" and shown[-1][1] == "RUN_FINISHED"
    assert [text.split(" ", 1)[1] for _, text in shown if text.startswith("TEXT_MESSAGE_CONTENT ")] \
        == [f"w{i}" for i in range(12)]
