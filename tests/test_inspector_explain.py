"""Every statement each inspector page sends reads an index, bounded: no page scans or sorts a table.

The tables hold bench.growth's data (10,000 runs, messages and events) ANALYZEd, as for the
library's own lookups in tests/test_explain.py, whose plan reader this uses. Each page is
requested from the WSGI app in process while its statements are recorded; each SELECT is
EXPLAINed. The same check fails on the shared schema alone (the last test).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Dict, List, Tuple

import pytest

from bench.growth import Growth, recorded
from better_agent_peewee import create_tables
from better_agent_peewee.inspector import inspector_app
from better_agent_peewee.schema import drop_performance_indexes
from tests.test_explain import filled, whole_table_reads  # noqa: F401 (filled: the same data, one fixture)

#: page name -> path: every page of the inspector, on the data's busiest keys.
PAGES: Dict[str, str] = {
    "overview": "/",
    "threads of an agent": "/agents/agent-3/threads",
    "threads, second page": "/agents/agent-3/threads?before_at={thread_at}&before_id=thread-0000503",
    "threads, title search": "/agents/agent-3/threads?q=nothing+starts+so",
    "threads, id search": "/agents/agent-3/threads?q=thread-0000503",
    "threads, id prefix search": "/agents/agent-0/threads?q=thread-00005",
    "threads, id prefix search, next page": "/agents/agent-0/threads?q=thread-00005&after_id=thread-0000549",
    "threads, id prefix of another agent's ids": "/agents/agent-3/threads?q=thread-",
    "thread (long)": "/threads/thread-long",
    "thread (long), older messages": "/threads/thread-long?before_at={message_at}&before_id=x",
    "thread of 5": "/threads/thread-0000321",
    "runs": "/runs",
    "runs of an agent": "/runs?agent=agent-4",
    "runs of an agent and status, since": "/runs?agent=agent-4&status=completed&since=800d",
    "runs, second page": "/runs?before_at={run_at}&before_id=run-00004321",
    "run": "/runs/run-00004320",
    "run, events after": "/runs/run-00004320?after=5",
}


def get(app: Any, path: str) -> Tuple[str, bytes]:
    """GET `path` from the WSGI app in process: (status, body)."""
    target, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": target,
        "QUERY_STRING": query,
        "HTTP_HOST": "127.0.0.1",
        "wsgi.input": io.BytesIO(b""),
    }
    answer: Dict[str, str] = {}
    body = b"".join(app(environ, lambda status, headers: answer.update(status=status)))
    return answer["status"], body


def _path(storage: Any, page: str) -> str:
    run = storage.runs.get("run-00004321")
    thread = storage.memory.threads.get("thread-0000503")
    middle = storage.memory.messages.list("thread-long", limit=2000)[0]
    return PAGES[page].format(
        run_at=run["startedAt"], thread_at=thread["updatedAt"], message_at=middle["createdAt"]
    )


def _statements(storage: Any, call: Callable[[], Any]) -> List[Tuple[str, Any]]:
    return [
        (sql, params)
        for sql, params in recorded(storage, call)
        if sql.lstrip().upper().startswith("SELECT") and " FROM " in sql.upper()
    ]


@pytest.mark.parametrize("page", list(PAGES))
def test_every_statement_of_a_page_reads_an_index(filled: Any, page: str) -> None:  # noqa: F811
    storage = filled
    app = inspector_app(storage)
    path = _path(storage, page)
    answers: List[Tuple[str, bytes]] = []
    statements = _statements(storage, lambda: answers.append(get(app, path)))
    assert answers[0][0] == "200 OK", answers[0][1][:2000]
    assert statements, f"{page} sent no SELECT"
    for sql, params in statements:
        bad, plan = whole_table_reads(storage.database, storage.dialect.name, sql, params)
        assert not bad, f"{page} on {storage.dialect.name}: {bad}\n{sql}\n{plan}"


def test_without_our_indexes_the_pages_read_whole_tables(filled: Any) -> None:  # noqa: F811
    """The check above can fail: on the shared schema alone the same pages scan or sort."""
    storage = filled
    db, dialect = storage.database, storage.dialect.name
    assert drop_performance_indexes(db)
    try:
        Growth(storage, dialect).analyze()
        app = inspector_app(storage)
        failing = []
        for page in ("overview", "threads of an agent", "thread (long)", "runs of an agent"):
            path = _path(storage, page)
            if any(
                whole_table_reads(db, dialect, sql, params)[0]
                for sql, params in _statements(storage, lambda p=path: get(app, p))
            ):  # type: ignore[misc]
                failing.append(page)
        # (An agent's hundred threads are few enough that a planner may sort them: not asserted.)
        assert set(failing) >= {"thread (long)", "runs of an agent"}, failing
    finally:
        create_tables(db)
        Growth(storage, dialect).analyze()

