"""Server-Sent Events: the `better_agent_peewee.sse` helper, and the Flask example serving it
to a thousand clients at once and to a real browser (headless Debian chromium, driven by
selenium), on all three dialects. Nothing here asserts how fast anything is (one check says a
body does not end before its `max_seconds`).
"""
from __future__ import annotations

import contextlib
import json
import selectors
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import peewee
import pytest
from werkzeug.serving import make_server

from better_agent_peewee import NotFoundError, create_tables, peewee_storage
from better_agent_peewee.sse import SSE_HEADERS, event_stream, resume_point
from tests.test_examples import load_flask_example, sse_messages
from tests.test_flask_load import login


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def test_resume_point_reads_last_event_id_then_after() -> None:
    assert resume_point(None) == 0
    assert resume_point("7") == 7
    assert resume_point(None, "3") == 3
    assert resume_point("7", "3") == 7  # a reconnecting EventSource wins over the page's ?after=
    assert resume_point("", "3") == 3
    for bad in ("-1", "x", "1.5", "٣", "9" * 30):
        with pytest.raises(ValueError, match="non-negative integer"):
            resume_point(bad)


def test_event_stream_frames_a_closed_stream(storage: Any) -> None:
    storage.streams.open("r")
    storage.streams.append_many("r", [{"type": "A", "text": "line\nbreak"}, {"type": "B"}])
    storage.streams.close("r")
    # By default Better Agent's wire: `id:` + `data:` per event, and the body simply ends.
    wire = "".join(event_stream(storage, "r"))
    assert wire.startswith("id: 1\ndata: {") and wire.endswith('"seq":2}\n\n')  # (jsonb orders keys)
    assert [(m["id"], json.loads(m["data"])) for m in sse_messages(wire.encode())] == [
        ("1", {"type": "A", "text": "line\nbreak", "seq": 1}), ("2", {"type": "B", "seq": 2})]
    # For an EventSource page: a retry hint first and an `end` event last.
    body = "".join(event_stream(storage, "r", retry_ms=2000, end_event=True))
    messages = sse_messages(body.encode())
    assert messages[0] == {"retry": "2000"}
    assert [(m["id"], json.loads(m["data"])) for m in messages[1:3]] == [
        ("1", {"type": "A", "text": "line\nbreak", "seq": 1}), ("2", {"type": "B", "seq": 2})]
    assert messages[3]["event"] == "end"
    assert json.loads(messages[3]["data"]) == {"runId": "r", "lastSeq": 2, "reason": "closed"}
    assert len(messages) == 4
    # Resuming after the last event: only the end.
    assert [m.get("event") for m in sse_messages("".join(event_stream(
        storage, "r", 2, retry_ms=2000, end_event=True)).encode())] == [None, "end"]
    assert "".join(event_stream(storage, "r", 2)) == ""
    assert SSE_HEADERS["Content-Type"].startswith("text/event-stream")
    with pytest.raises(NotFoundError):
        event_stream(storage, "missing")  # at once: before the response starts


def test_event_stream_heartbeats_and_ends_after_max_seconds(storage: Any) -> None:
    storage.streams.open("quiet")
    # Heartbeats while the stream is quiet, taken as they come: under load a short max_seconds
    # can run out (resume's first poll, a late wake-up) before the first heartbeat is due.
    body = event_stream(storage, "quiet", heartbeat=0.02, max_seconds=30, retry_ms=None)
    assert [next(body) for _ in range(3)] == [": heartbeat\n\n"] * 3
    body.close()
    # After max_seconds the body ends by itself, not before, with no `end` (the browser reconnects).
    started = time.monotonic()
    frames = list(event_stream(storage, "quiet", heartbeat=0.02, max_seconds=0.2, retry_ms=None))
    assert time.monotonic() - started >= 0.2
    assert all(f == ": heartbeat\n\n" for f in frames)


def test_event_stream_says_when_the_stream_was_deleted(storage: Any) -> None:
    storage.streams.open("gone")
    storage.streams.append("gone", {"type": "A"})
    body = event_stream(storage, "gone", max_seconds=60, retry_ms=2000, end_event=True)
    assert next(body).startswith("retry:")
    assert next(body).startswith("id: 1\n")
    storage.delete("streams", "gone")
    rest = sse_messages("".join(body).encode())
    assert rest[-1]["event"] == "end" and json.loads(rest[-1]["data"])["reason"] == "deleted"


# -- the Flask example, served for real ------------------------------------------------------------


@contextlib.contextmanager
def serving(database_url: str, **config: Any) -> Iterator[Tuple[Any, int]]:
    """The Flask example on a threaded werkzeug server on a free 127.0.0.1 port: (app, port)."""
    app = load_flask_example().create_app(database_url, **config)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    server.request_queue_size = 1024
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, server.server_port
    finally:
        server.shutdown()
        thread.join(30)
        app.extensions["agent_workers"].shutdown()
        db = app.extensions["agent_storage"].database
        db.close_all() if hasattr(db, "close_all") else db.close()


class Client:
    """One SSE request on a raw socket (HTTP/1.0: the body ends when the server closes)."""

    def __init__(self, port: int, run_id: str, cookie: str) -> None:
        self.run_id = run_id
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(f"GET /api/agents/runs/{run_id}/stream HTTP/1.0\r\nHost: localhost\r\n"
                          f"Cookie: {cookie}\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.data = bytearray()
        self.done = False

    def body(self) -> bytes:
        head, _, body = bytes(self.data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
        if b"transfer-encoding: chunked" not in head.lower():
            return body
        out = bytearray()  # chunked (werkzeug streams that way even to HTTP/1.0 clients)
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2:]
        return bytes(out)


def pump(clients: List[Client], until: Any, seconds: float = 120) -> None:
    """Read from every client until `until(client)` holds for all of them (or they closed)."""
    selector = selectors.DefaultSelector()
    waiting = {c.sock.fileno(): c for c in clients if not until(c) and not c.done}
    for c in waiting.values():
        selector.register(c.sock, selectors.EVENT_READ, c)
    import time
    deadline = time.monotonic() + seconds
    try:
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                c = key.data
                chunk = c.sock.recv(65536)
                if chunk:
                    c.data += chunk
                else:
                    c.done = True
                if c.done or until(c):
                    selector.unregister(c.sock)
                    waiting.pop(key.fd, None)
    finally:
        selector.close()
    assert not waiting, f"{len(waiting)} clients still waiting"


def test_the_flask_example_serves_a_thousand_followers_in_one_process(database_url: str) -> None:
    runs, per_run, events = 10, 100, 5
    with serving(database_url) as (app, port):
        storage = app.extensions["agent_storage"]
        for r in range(runs):
            storage.runs.start(f"run-{r}", "demo")  # (no scope: any logged-in user may follow it)
            storage.streams.open(f"run-{r}")
        storage.database.close()
        cookie = login(port, "alice")
        clients: List[Client] = []
        for r in range(runs):  # connect 100 at a time: each gets its headers, then the next 100
            batch = [Client(port, f"run-{r}", cookie) for _ in range(per_run)]
            pump(batch, lambda c: b"\r\n\r\n" in c.data)
            clients += batch
        # A client has its headers once the first frame (`retry:`) is out, a moment before its
        # follower is registered with the poller: wait for the registrations, then check that all
        # of them follow at once, before any event is appended.
        poller = storage.streams.poller()
        deadline = time.monotonic() + 60
        while sum(len(w) for w in poller.followed.values()) < runs * per_run and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(len(w) for w in poller.followed.values()) == runs * per_run  # all following at once
        for r in range(runs):
            storage.streams.append_many(f"run-{r}", [{"type": "TEXT_MESSAGE_CONTENT", "delta": f"w{i}"}
                                                     for i in range(events)])
            storage.streams.close(f"run-{r}")
        storage.database.close()
        pump(clients, lambda c: c.done)
        for c in clients:
            c.sock.close()
            messages = [m for m in sse_messages(c.body()) if "comment" not in m]
            assert [m["id"] for m in messages] == [str(i) for i in range(1, events + 1)]  # and the end
            assert [json.loads(m["data"])["delta"] for m in messages] == [f"w{i}" for i in range(events)]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@contextlib.contextmanager
def chromium(profile: Path, *flags: str, console_log: bool = False) -> Iterator[Any]:
    """Headless Debian chromium driven by selenium through Debian's chromedriver (no download);
    `flags` are added to CHROMIUM_FLAGS, `console_log` keeps the console for ``get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, \
        "chromium and chromium-driver are not installed (scripts/test.sh installs them)"
    options = Options()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", *flags]:
        options.add_argument(flag)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_browser_shows_a_runs_events_as_they_are_appended(database_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(database_url) as (app, port), chromium(tmp_path / "profile") as browser:
        storage = app.extensions["agent_storage"]
        storage.runs.start("live run", "demo")
        storage.streams.open("live run")
        storage.streams.append("live run", {"type": "RUN_STARTED"})
        browser.get(f"http://127.0.0.1:{port}/runs/nothing/watch")  # the site's origin, to log in
        browser.execute_script("return fetch('/login', {method: 'POST', headers: {'content-type': "
                               "'application/json'}, body: JSON.stringify({user: 'alice'})})"
                               ".then(r => r.status)")
        browser.get(f"http://127.0.0.1:{port}/runs/live%20run/watch")
        wait = WebDriverWait(browser, 60)

        def shown() -> List[Dict[str, str]]:
            return [{"seq": li.get_attribute("data-seq"), "text": li.text}
                    for li in browser.find_elements(By.CSS_SELECTOR, "#events li")]

        wait.until(lambda _: len(shown()) == 1)
        for word in ("Hello", "there"):  # appended while the page is open: they show up live
            storage.streams.append("live run", {"type": "TEXT_MESSAGE_CONTENT", "delta": word})
            text = f"TEXT_MESSAGE_CONTENT {word}"
            wait.until(lambda _, text=text: shown()[-1]["text"] == text)
        assert browser.find_element(By.ID, "status").text == "following"
        storage.streams.append("live run", {"type": "RUN_FINISHED"})
        storage.streams.close("live run")
        storage.database.close()
        wait.until(lambda _: browser.find_element(By.ID, "status").text == "ended")
        assert shown() == [{"seq": "1", "text": "RUN_STARTED"},
                           {"seq": "2", "text": "TEXT_MESSAGE_CONTENT Hello"},
                           {"seq": "3", "text": "TEXT_MESSAGE_CONTENT there"},
                           {"seq": "4", "text": "RUN_FINISHED"}]


# -- the docs' SSE views, served for real ------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def docs_views() -> List[str]:
    """The python blocks of docs/followers.md that define an SSE view (Flask, then Django)."""
    from tests.test_readme import blocks

    text = (DOCS / "followers.md").read_text(encoding="utf-8")
    return [code for lang, _, code in blocks(text) if lang == "python" and "def run_events" in code]


@contextlib.contextmanager
def django_app(view: Any) -> Iterator[Any]:
    """A Django WSGI app routing runs/<run_id>/events to `view`, while the block runs. Django's
    settings are per process: the example's (examples/django_app.py) are the ones configured,
    and only ROOT_URLCONF is overridden here, then restored."""
    import sys
    import types

    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import override_settings
    from django.urls import clear_url_caches, path

    from tests.test_examples import load_django_example

    load_django_example()
    urls = types.ModuleType("bap_docs_urls")
    urls.urlpatterns = [path("runs/<str:run_id>/events", view)]  # type: ignore[attr-defined]
    sys.modules["bap_docs_urls"] = urls
    try:
        with override_settings(ROOT_URLCONF="bap_docs_urls"):
            clear_url_caches()
            yield WSGIHandler()
    finally:
        clear_url_caches()


def get(port: int, path: str, headers: Dict[str, str]) -> Tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("framework", ["flask", "django"])
def test_the_docs_sse_views_answer_what_the_docs_promise(framework: str, storage: Any) -> None:
    views = docs_views()
    assert len(views) == 2, "docs/followers.md: expected a Flask and a Django SSE view"
    namespace: Dict[str, Any] = {"storage": storage, "__name__": "docs_view"}
    exec(compile(views[0] if framework == "flask" else views[1], "docs/followers.md", "exec"), namespace)
    with contextlib.ExitStack() as stack:
        app = namespace["app"] if framework == "flask" else stack.enter_context(
            django_app(namespace["run_events"]))
        check_docs_view(app, storage)


def check_docs_view(app: Any, storage: Any) -> None:
    """Serve `app` on a real werkzeug server and check each status the docs promise."""
    storage.streams.open("doc-run")
    storage.streams.append_many("doc-run", [{"type": "A"}, {"type": "B"}, {"type": "C"}])
    storage.streams.close("doc-run")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_port
        status, body = get(port, "/runs/doc-run/events", {"Last-Event-ID": "1"})
        assert status == 200
        messages = sse_messages(body)
        assert [m.get("id") for m in messages if "data" in m] == ["2", "3"]
        status, body = get(port, "/runs/nope/events", {})
        assert status == 404 and b"nope" in body
        status, body = get(port, "/runs/doc-run/events", {"Last-Event-ID": "x"})
        assert status == 400 and b"Last-Event-ID" in body
        status, body = get(port, "/runs/doc-run/events?after=-2", {})
        assert status == 400 and b"after" in body
        status, body = get(port, "/runs/doc-run/events?after=999", {})  # past the end: nothing to send
        assert status == 200 and [m for m in sse_messages(body) if "data" in m] == []
    finally:
        server.shutdown()
        thread.join(30)
        server.server_close()
