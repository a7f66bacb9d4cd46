"""The inspector (`better-agent-peewee inspect`) in process, on the three dialects: every page
against a seeded database, stored strings escaped, writes only when allowed and with the CSRF
token, the token and the loopback rule, keyset pages, bad input, and nothing served but the assets.
The real browser is tests/test_inspector_browser.py.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes, urlencode

import peewee
import pytest

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.inspector import inspector_app, make_inspector_server
from better_agent_peewee.inspector.queries import Reader
from tests.inspector_seed import HOSTILE, seed


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    storage = peewee_storage(database)
    seed(storage)
    return storage


class Answer:
    """A response: status code, headers, text."""

    def __init__(self, status: str, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.code = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.text = body.decode("utf-8")


def call(
    app: Any,
    method: str,
    path: str,
    form: Optional[Dict[str, str]] = None,
    headers: Optional[Dict[str, str]] = None,
) -> Answer:
    """One request to the WSGI app in process."""
    target, _, query = path.partition("?")
    data = urlencode(form or {}).encode()
    path_info = unquote_to_bytes(target).decode("latin-1")  # as a WSGI server decodes it
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "RAW_URI": path,
        "HTTP_HOST": "127.0.0.1:8765",
        "CONTENT_LENGTH": str(len(data)),
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "wsgi.input": io.BytesIO(data),
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen: Dict[str, Any] = {}
    body = b"".join(app(environ, lambda status, hs: seen.update(status=status, headers=hs)))
    return Answer(seen["status"], seen["headers"], body)


def visible(html: str) -> str:
    """The page's text, roughly as a person reads it (tags out, entities kept)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_every_page_shows_the_seeded_data(storage: Any) -> None:
    app = inspector_app(storage)
    overview = call(app, "GET", "/")
    assert overview.code == 200 and overview.headers["content-type"].startswith("text/html")
    text = visible(overview.text)
    for expected in (
        "Agents",
        "support",
        "planner",
        "Runs per hour",
        "Last 24 hours",
        "Last 7 days",
        "Run duration",
        "Running runs",
        "run-live",
        "run-stale",
        "stale?",
    ):
        assert expected in text, expected
    assert overview.text.count("<svg") == 3  # two hourly charts and the durations
    threads = call(app, "GET", "/agents/support/threads")
    assert (
        threads.code == 200 and "Trip to Lisbon" in threads.text and "Refund for order 1000" in threads.text
    )
    thread = call(app, "GET", "/threads/trip-to-lisbon")
    text = visible(thread.text)
    assert thread.code == 200 and "Find me a hotel in Lisbon" in text and "search_hotels" in text
    assert 'class="tool-call"' in thread.text and 'data-role="tool"' in thread.text
    assert "result of tool call call-1" in text and "Lisbon" in text and "budget" in text  # the state
    assert (
        text.index("run-trip-1")
        < text.index("Find me a hotel")
        < text.index("run-trip-2")
        < text.index("Book Alfama Rooms")
    )  # the runs in between, with status and duration
    assert "failed" in text and "7.0 s" in text
    runs = call(app, "GET", "/runs")
    assert runs.code == 200 and "run-live" in runs.text and "run-0000" in runs.text
    run = call(app, "GET", "/runs/run-trip-2")
    text = visible(run.text)
    assert run.code == 200 and "booking API answered 503" in text and "AGENT_ERROR" in text
    assert [int(s) for s in re.findall(r'data-seq="(\d+)"', run.text)] == [1, 2, 3, 4, 5, 6]
    assert "RUN_STARTED" in text and "+350 ms" in text
    live = call(app, "GET", "/runs/run-live")
    assert 'data-live="1"' in live.text and 'data-stream="/api/runs/run-live/stream"' in live.text


def test_every_stored_string_is_escaped(storage: Any) -> None:
    app = inspector_app(storage)
    agent = HOSTILE[1]
    pages = [
        "/",
        "/runs",
        "/runs/run-hostile",
        "/threads/evil-0",
        "/threads/evil-1",
        "/threads/evil-3",
        "/agents/" + re.sub(r"[^A-Za-z0-9]", lambda m: f"%{ord(m.group()):02X}", agent) + "/threads",
        "/runs?agent=" + re.sub(r"[^A-Za-z0-9]", lambda m: f"%{ord(m.group()):02X}", agent),
    ]
    for path in pages:
        answer = call(app, "GET", path)
        assert answer.code == 200, (path, answer.text[:500])
        for raw in ("<script>window", '<img src="x"', "<svg onload", 'onerror="window', 'href="javascript:'):
            assert raw not in answer.text, (path, raw)
        assert "window.__pwned" in answer.text, path  # shown, as text
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in call(app, "GET", "/threads/evil-0").text


def test_read_only_by_default(storage: Any) -> None:
    app = inspector_app(storage)
    for path in ("/", "/runs/run-live", "/runs/run-stale"):
        assert 'method="post"' not in call(app, "GET", path).text  # no write button anywhere
    for path, form in (
        ("/runs/run-live/abort", {}),
        ("/reap", {"stale_after": "1m"}),
        ("/prune", {"older_than": "1d"}),
    ):
        assert call(app, "POST", path, form).code == 403
    assert call(app, "GET", "/prune?older_than=1d").code == 403
    assert call(app, "POST", "/api/runs/run-live/abort").code == 403
    assert storage.runs.get("run-live").get("abortRequestedAt") is None
    assert storage.runs.get("run-stale")["status"] == "running"


def test_writes_need_allow_writes_and_the_csrf_token(storage: Any) -> None:
    app = inspector_app(storage, allow_writes=True)
    page = call(app, "GET", "/runs/run-live").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert call(app, "POST", "/runs/run-live/abort", {"csrf": "wrong"}).code == 403
    assert call(app, "POST", "/runs/run-live/abort", {}).code == 403
    assert storage.runs.get("run-live").get("abortRequestedAt") is None
    done = call(app, "POST", "/runs/run-live/abort", {"csrf": token})
    assert done.code == 303 and done.headers["location"] == "/runs/run-live"
    assert storage.runs.get("run-live")["abortRequestedAt"] is not None
    assert "Abort requested at" in call(app, "GET", "/runs/run-live").text
    # The mounted API's writes take the token as a header.
    assert call(app, "POST", "/api/runs/run-live/abort").code == 403
    assert call(app, "POST", "/api/runs/run-live/abort", headers={"X-CSRF-Token": token}).code == 204
    # Reap: the stale run (silent for an hour) is failed, the live one kept.
    assert "Reap stale runs" in call(app, "GET", "/").text
    assert call(app, "POST", "/reap", {"csrf": token, "stale_after": "soon"}).code == 400
    reaped = call(app, "POST", "/reap", {"csrf": token, "stale_after": "30m"})
    assert reaped.code == 200 and "Marked 1 stale runs failed" in reaped.text
    assert (
        storage.runs.get("run-stale")["status"] == "failed"
        and storage.runs.get("run-live")["status"] == "running"
    )
    # Prune: the preview deletes nothing; the confirmation does.
    before = len(Reader(storage).runs(["support", "planner"], ["completed"], limit=500))
    preview = call(app, "GET", "/prune?older_than=3d")
    assert (
        preview.code == 200
        and "would prune" in preview.text
        and 'name="older_than" value="3d"' in preview.text
    )
    assert len(Reader(storage).runs(["support", "planner"], ["completed"], limit=500)) == before
    pruned = call(app, "POST", "/prune", {"csrf": token, "older_than": "3d"})
    assert pruned.code == 200 and "pruned" in pruned.text
    after = Reader(storage).runs(["support", "planner"], ["completed"], limit=500)
    assert 0 < len(after) < before
    assert call(app, "GET", "/prune?older_than=never").code == 400


def test_the_token_and_the_loopback_rule(storage: Any) -> None:
    open_app = inspector_app(storage)
    assert call(open_app, "GET", "/", headers={"Host": "attacker.example:8765"}).code == 403  # DNS rebinding
    assert call(open_app, "GET", "/", headers={"Host": "localhost:8765"}).code == 200
    with pytest.raises(ValueError, match="--token"):
        make_inspector_server(open_app, "0.0.0.0", 0)
    app = inspector_app(storage, token="s3cret")
    assert call(app, "GET", "/").code == 401
    assert call(app, "GET", "/?token=wrong").code == 401
    first = call(app, "GET", "/runs?agent=support&token=s3cret")
    assert first.code == 303 and first.headers["location"] == "/runs?agent=support"
    assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=Strict" in first.headers["set-cookie"]
    elsewhere = call(app, "GET", "//attacker.example/runs?token=s3cret")  # no redirect to another site
    assert elsewhere.code == 303 and elsewhere.headers["location"] == "/attacker.example/runs"
    cookie = first.headers["set-cookie"].split(";")[0]
    assert call(app, "GET", "/", headers={"Cookie": cookie, "Host": "192.0.2.1"}).code == 200
    assert call(app, "GET", "/", headers={"Authorization": "Bearer s3cret"}).code == 200
    assert call(app, "GET", "/api/runs/run-trip-1/stream").code == 401


def test_nothing_but_the_assets_is_served(storage: Any) -> None:
    app = inspector_app(storage)
    css = call(app, "GET", "/assets/inspector.css")
    assert (
        css.code == 200 and css.headers["content-type"].startswith("text/css") and "--completed" in css.text
    )
    assert call(app, "GET", "/assets/inspector.js").headers["content-type"].startswith("text/javascript")
    for path in (
        "/assets/../app.py",
        "/assets/..%2Fapp.py",
        "/assets/%2E%2E/__init__.py",
        "/assets/",
        "/assets/app.py",
        "/app.py",
        "/etc/passwd",
        "/assets/inspector.css/x",
    ):
        answer = call(app, "GET", path)
        assert answer.code == 404, path
        assert "import" not in answer.text
    assert call(app, "DELETE", "/runs").code == 405


def test_keyset_pages_visit_every_thread_and_run_once(storage: Any) -> None:
    reader = Reader(storage)
    seen: List[str] = []
    before = None
    while True:
        page = reader.threads("support", before, limit=7)
        seen += [t["id"] for t in page]
        if len(page) < 7:
            break
        before = (page[-1]["updatedAt"], page[-1]["id"])
    assert len(seen) == len(set(seen)) == 41 and seen[0] == "trip-to-lisbon"
    # Ties: threads sharing one updatedAt still page in id order, none lost or repeated.
    for i in range(9):
        storage.set(
            "memoryThreads",
            f"tie-{i}",
            {"id": f"tie-{i}", "agentName": "ties", "createdAt": 5, "updatedAt": 1000},
        )
    ids, before = [], None
    while True:
        page = reader.threads("ties", before, limit=4)
        ids += [t["id"] for t in page]
        if len(page) < 4:
            break
        before = (page[-1]["updatedAt"], page[-1]["id"])
    assert ids == [f"tie-{i}" for i in reversed(range(9))]
    runs, before_run = [], None
    while True:
        batch = reader.runs(
            ["support", "planner"], ["completed", "failed", "running"], before=before_run, limit=9
        )
        runs += batch
        if len(batch) < 9:
            break
        before_run = (batch[-1].started_at, batch[-1].run_id)
    keys = [(r.started_at, r.run_id) for r in runs]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
    assert len(runs) == len(
        reader.runs(["support", "planner"], ["completed", "failed", "running"], limit=500)
    )


def test_filters_search_and_paging_links(storage: Any) -> None:
    app = inspector_app(storage)
    failed = call(app, "GET", "/runs?agent=support&status=failed")
    statuses = set(re.findall(r'class="badge s-(\w+)', failed.text))
    assert statuses == {"failed"} and "run-trip-2" in failed.text
    recent = call(app, "GET", "/runs?since=2h")
    assert "run-live" in recent.text and "run-0100" not in recent.text
    old = call(app, "GET", "/runs?until=2h")
    assert "run-live" not in old.text and "run-0010" in old.text
    assert call(app, "GET", "/runs?since=2026-13-45").code == 400
    assert call(app, "GET", "/runs?status=nope").code == 400
    assert call(app, "GET", "/runs?before_at=abc&before_id=x").code == 400
    assert call(app, "GET", "/runs/run-trip-2?after=-1").code == 400
    found = call(app, "GET", "/agents/support/threads?q=refund+for+order+101")
    titles = re.findall(r">(Refund for order \d+|Trip to Lisbon)</a>", found.text)
    assert sorted(titles) == [f"Refund for order {n}" for n in range(1010, 1020)]
    by_id = call(app, "GET", "/agents/support/threads?q=trip-to-lisbon")
    assert "Trip to Lisbon" in by_id.text
    first = call(app, "GET", "/agents/support/threads")
    more = re.search(r'href="(/agents/support/threads\?[^"]+)"[^>]*rel="next"', first.text)
    assert first.text.count("/threads/support-") + first.text.count("/threads/trip") <= 50
    assert more is None  # 41 threads: one page
    assert call(app, "GET", "/threads/nope").code == 404 and call(app, "GET", "/runs/nope").code == 404


def test_the_command_serves_and_refuses_an_open_host_without_a_token(database_url: str,
                                                                     storage: Any) -> None:
    """`better-agent-peewee inspect` prints its address and answers there; another host needs --token."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    storage.database.close()
    refused = subprocess.run([sys.executable, "-m", "better_agent_peewee", "inspect", "-d", database_url,
                              "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "--token" in refused.stderr, refused.stderr
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "better_agent_peewee", "inspect", "-d", database_url,
                             "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        address = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert address, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        with urllib.request.urlopen(address.group(0) + "runs/run-trip-2", timeout=30) as response:
            page = response.read().decode()
        print(f"inspect answered its first page {time.monotonic() - started:.2f}s after it was started")
        assert "booking API answered 503" in page and "read-only" in line
    finally:
        proc.terminate()
        proc.wait(30)
