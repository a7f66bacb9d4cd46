"""The inspector's thread search on the three dialects: an id prefix is a range of the id index,
exact (case, ``%``, ``_``, ``\\``, non-ASCII, MySQL's PAD SPACE), paged by key through the id
matches and then the title matches, never another agent's threads.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, List, Optional

import peewee
import pytest

from bench.growth import Growth, recorded
from bench.prune_scale import bulk_insert
from better_agent_peewee import create_tables, open_database, peewee_storage
from better_agent_peewee.dialects.base import prefix_successor
from better_agent_peewee.inspector import inspector_app
from better_agent_peewee.inspector.queries import Reader, SearchCursor
from tests.test_explain import whole_table_reads
from tests.test_inspector import call

#: Ids of agent "a" that the special-character and non-ASCII searches tell apart.
SPECIAL = ["x%y-1", "x_y-2", "x\\y-3", "xay-4", "xzy-5", "X%y-6", "é-1", "éa", "e-1", "ê", "😀-1", "😀😀",
           "z\U0010ffffa", "z\U0010ffff", "{", "pad", "pad\x01x", "pad\tx", "pad x", "padx"]


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    storage = peewee_storage(database)
    with storage.transaction():
        for i in range(130):  # more than two pages of id matches, their titles no match
            _thread(storage, f"case-{i:03d}", "a", f"Ticket {i}", i)
        for i in range(5):  # another agent's threads with matching ids
            _thread(storage, f"case-b{i}", "b", f"case-b{i}", i)
        for i in range(3):  # agent a's threads whose title (not id) starts with the prefix
            _thread(storage, f"t-{i}", "a", f"CASE-file {i}", 1000 + i)
        for i, thread_id in enumerate(SPECIAL):
            _thread(storage, thread_id, "a", None, 2000 + i)
    return storage


def _thread(storage: Any, thread_id: str, agent: str, title: Optional[str], minute: int) -> None:
    at = 1_700_000_000_000 + minute * 60_000
    storage.set("memoryThreads", thread_id, {"id": thread_id, "agentName": agent, "title": title,
                                             "createdAt": at, "updatedAt": at})


def _all(reader: Reader, agent: str, prefix: str, limit: int = 50) -> List[List[str]]:
    """Every page of the search, as lists of ids."""
    pages: List[List[str]] = []
    cursor: Optional[SearchCursor] = None
    while True:
        found, cursor = reader.search_threads(agent, prefix, cursor, limit=limit)
        pages.append([t["id"] for t in found])
        if cursor is None or len(pages) > 20:
            return pages


def test_an_id_prefix_pages_through_the_agents_ids_then_the_titles(storage: Any) -> None:
    pages = _all(Reader(storage), "a", "case-")
    ids = [i for page in pages for i in page]
    assert ids[:130] == [f"case-{i:03d}" for i in range(130)]  # in id order, each once
    assert ids[130:] == ["t-2", "t-1", "t-0"]  # then the titles (any case), newest first
    assert [len(p) for p in pages] == [50, 50, 33]
    assert not any(i.startswith("case-b") for i in ids)  # another agent's threads are not shown
    assert [[t["id"] for t in Reader(storage).search_threads("b", "case-")[0]]] == [
        [f"case-b{i}" for i in range(5)]]  # (title matches too, listed once, as id matches)


def test_a_full_page_of_ids_goes_on_to_the_titles(storage: Any) -> None:
    pages = _all(Reader(storage), "a", "case-", limit=65)
    assert [len(p) for p in pages] == [65, 65, 3] and pages[2] == ["t-2", "t-1", "t-0"]


@pytest.mark.parametrize("prefix, expected", [
    ("x%", ["x%y-1"]),  # LIKE's wildcards and escape are plain characters
    ("x_", ["x_y-2"]),
    ("x\\", ["x\\y-3"]),
    ("x", ["x%y-1", "x\\y-3", "x_y-2", "xay-4", "xzy-5"]),
    ("X", ["X%y-6"]),  # ids are case-sensitive
    ("é", ["é-1", "éa"]),
    ("e", ["e-1"]),
    ("😀", ["😀-1", "😀😀"]),
    ("z\U0010ffff", ["z\U0010ffff", "z\U0010ffffa"]),  # no successor of U+10FFFF: the next 'z' is '{'
    ("pad", ["pad", "pad\tx", "pad\x01x", "pad x", "padx"]),  # PAD SPACE: 'pad\x01x' < 'pad' on MySQL
    ("pad ", ["pad x"]),  # (MySQL's range holds 'pad' too: not a match)
    ("pad\t", ["pad\tx"]),
    ("nothing", []),
])
def test_an_id_prefix_is_exact(storage: Any, prefix: str, expected: List[str]) -> None:
    found, after = Reader(storage).threads_by_id_prefix("a", prefix)
    assert sorted(t["id"] for t in found) == sorted(expected) and after is None
    assert all(t["title"] is None and t["updatedAt"] > 0 for t in found)


def test_the_id_matches_come_in_the_index_order_of_the_dialect(storage: Any, dialect: str) -> None:
    """By code point, but on MySQL a control character before the padding space sorts first."""
    found = [t["id"] for t in Reader(storage).threads_by_id_prefix("a", "pad")[0]]
    by_code_point = ["pad", "pad\x01x", "pad\tx", "pad x", "padx"]
    assert found == (["pad\x01x", "pad\tx", "pad", "pad x", "padx"] if dialect == "mysql" else by_code_point)


def test_the_pages_link_on_through_ids_and_titles(storage: Any) -> None:
    app = inspector_app(storage)
    path: Optional[str] = "/agents/a/threads?q=case-"
    seen: List[str] = []
    while path is not None:
        page = call(app, "GET", path)
        assert page.code == 200, page.text
        seen += re.findall(r'<code>([^<]+)</code>', page.text)
        more = re.search(r'href="([^"]+)"[^>]*rel="next"', page.text)
        path = more.group(1).replace("&amp;", "&") if more else None
        assert len(seen) < 200
    assert seen == [f"case-{i:03d}" for i in range(130)] + ["t-2", "t-1", "t-0"]
    assert "id starts with it" in page.text


def test_the_successor_of_a_prefix() -> None:
    assert prefix_successor("abc") == "abd"
    assert prefix_successor("a\ud7ff") == "a\ue000"  # (past the surrogates)
    assert prefix_successor("a\U0010ffff") == "b"
    assert prefix_successor("\U0010ffff\U0010ffff") is None and prefix_successor("") is None


def test_a_prefix_longer_than_any_id_finds_nothing(storage: Any) -> None:
    assert Reader(storage).threads_by_id_prefix("a", "c" * 256) == ([], None)
    found: Dict[str, Any] = {t["id"]: t for t in Reader(storage).search_threads("a", "c" * 256)[0]}
    assert found == {}


def test_an_id_prefix_is_a_range_of_the_agent_id_index(database: peewee.Database, dialect: str) -> None:
    """6,000 threads, every id starting "t-", 100 of them agent "rare"'s: a page of its id matches is a
    range of bap_threads_agent_id_idx (agent, id), not the primary key's range filtered by agent
    (some 3,000 rows a page) nor the agent's threads sorted, on SQLite and MySQL/MariaDB."""
    create_tables(database)
    storage = peewee_storage(database)
    at = 1_700_000_000_000
    with storage.transaction():
        bulk_insert(storage, storage.models.thread, [
            {"id": f"t-{i:05d}", "agent_name": "rare" if i % 60 == 7 else f"agent-{i % 20}", "title": "x",
             "created_at": at, "updated_at": at + i} for i in range(6000)])
    Growth(storage, dialect).analyze()
    reader = Reader(storage)
    for after in (None, "t-03007"):
        ((sql, params),) = [(q, p) for q, p in recorded(storage, lambda a=after: reader.threads_by_id_prefix(
            "rare", "t-", a)) if q.lstrip().upper().startswith("SELECT")]
        bad, plan = whole_table_reads(database, dialect, sql, params)
        # (PostgreSQL's costs prefer the agent's 100 threads sorted at this size: bounded, allowed.)
        assert not bad, f"{bad}\n{sql}\n{plan}"
        assert "bap_threads_agent_id_idx" in plan or dialect == "postgres", plan
    found, after = reader.threads_by_id_prefix("rare", "t-")
    assert [t["id"] for t in found] == [f"t-{i:05d}" for i in range(7, 3000, 60)] and after == "t-02947"


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_whole_id_is_found_under_a_language_aware_collation(server: Any) -> None:
    # ICU's en-US sorts ':' before '9', so the range ['thread-19', 'thread-1:') is empty there:
    # the whole id is probed by its primary key first.
    name = f"bap_icu_{os.getpid()}"
    server.admin_execute(f'CREATE DATABASE "{name}" OWNER "{server.user}" TEMPLATE template0 '
                         "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'")
    try:
        db = open_database(dataclasses.replace(server, database=name, _launch=None, _proc=None).url)
        try:
            create_tables(db)
            storage = peewee_storage(db)
            for thread_id in ("thread-19", "thread-190", "thread-2"):
                _thread(storage, thread_id, "a", None, 1)
            found, _ = Reader(storage).search_threads("a", "thread-19")
            assert [t["id"] for t in found][:1] == ["thread-19"]
        finally:
            db.close()
    finally:
        server.drop_database(name)


def test_a_prefix_no_id_can_hold_finds_no_id_and_fails_nothing(storage: Any) -> None:
    # A NUL cannot even be bound on PostgreSQL (it was a 500 there): no id matches, titles as ever.
    for prefix in ("\x00", "case-\x00", "\ud800"):
        assert Reader(storage).threads_by_id_prefix("a", prefix) == ([], None)
        assert Reader(storage).search_threads("a", prefix)[0] == []
    assert Reader(storage).threads_by_id_prefix("a", "case-", after="\x00") == ([], None)
