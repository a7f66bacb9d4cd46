"""What the thread pages read: an agent's threads (paged, searched), a thread's messages and runs."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import peewee

from ..dialects.base import prefix_range
from ..query import marker
from ..records import MAX_KEY_LENGTH, string_problem
from .statements import MESSAGES_PAGE, PAGE, TITLE_SCAN, RunRow, Statements

__all__ = ["ThreadReads", "SearchCursor"]


class SearchCursor(NamedTuple):
    """Where a thread search goes on: among the id matches after `after_id`, or (`titles`) among
    the title matches older than the key `before` (None: from the newest)."""

    after_id: Optional[str] = None
    titles: bool = False
    before: Optional[Tuple[int, str]] = None


class ThreadReads(Statements):
    """Keyset pages of an agent's threads, thread search, a thread's messages and its runs."""

    def threads(self, agent: str, before: Optional[Tuple[int, str]] = None,
                limit: int = PAGE) -> List[Dict[str, Any]]:
        """A page of `agent`'s threads, newest ``updatedAt`` first, after the key `before`."""
        T = self.m.thread

        def bases() -> List[peewee.Query]:
            return [T.select(T.updated_at, T.id, T.title, T.scope, T.created_at)
                    .where(self._eq(T.agent_name, "agent0"))]

        rows = self._keyset(("threads",), bases, {"agent0": agent}, T.updated_at, T.id, before, limit)
        return [{"id": i, "title": title, "scope": scope, "createdAt": self._ms(c), "updatedAt": u}
                for u, i, title, scope, c in rows]

    def search_threads(self, agent: str, prefix: str, cursor: Optional[SearchCursor] = None,
                       limit: int = PAGE, scan: int = TITLE_SCAN
                       ) -> Tuple[List[Dict[str, Any]], Optional[SearchCursor]]:
        """Threads of `agent` whose id starts with `prefix` (in id order), then those whose title
        starts with it, case-folded (newest first, examining at most `scan` threads a page); from
        `cursor` on (None: the first page). Returns (matches, where to go on or None)."""
        cursor = cursor or SearchCursor()
        found: List[Dict[str, Any]] = []
        if not cursor.titles:
            found, after = self.threads_by_id_prefix(agent, prefix, cursor.after_id, limit)
            if cursor.after_id is None:
                found = self._whole_id_first(agent, prefix, found)
            if after is not None:
                return found, SearchCursor(after_id=after)
            if len(found) >= limit:  # (the id matches end here: the next page starts on the titles)
                return found, SearchCursor(titles=True)
        titles, before = self._title_matches(agent, prefix, cursor.before, limit - len(found), scan)
        return found + titles, None if before is None else SearchCursor(titles=True, before=before)

    def _whole_id_first(self, agent: str, prefix: str, found: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """`found` with the thread whose id is `prefix` itself first: a primary key probe, so a
        whole id is found even where the range is not code point ordered (a PostgreSQL database
        of a language-aware collation sorts ``thread-1:`` before ``thread-19``)."""
        if string_problem(prefix) or len(prefix) > MAX_KEY_LENGTH:
            return found
        exact = self.storage.memory.threads.get(prefix)
        if exact is None or exact.get("agentName") != agent:
            return found
        return [exact] + [t for t in found if t["id"] != prefix]

    def threads_by_id_prefix(self, agent: str, prefix: str, after: Optional[str] = None,
                             limit: int = PAGE) -> Tuple[List[Dict[str, Any]], Optional[str]]:
        """`agent`'s threads whose id starts with `prefix` (exactly: case, ``%``, ``_`` and ``\\``
        are plain characters), in the id column's order after the id `after`, at most `limit`:
        a range of ``bap_threads_agent_id_idx``. Returns (matches, the id to go on after or None)."""
        T = self.m.thread
        if len(prefix) > MAX_KEY_LENGTH or string_problem(prefix) or string_problem(after or ""):
            return [], None  # (no id is that long, or holds a NUL or a lone surrogate: none can be bound)
        low, high = prefix_range(prefix, MAX_KEY_LENGTH, self.dialect.pads_spaces)

        def build() -> peewee.Query:
            query: peewee.Query = (T.select(T.id, T.title, T.scope, T.created_at, T.updated_at)
                                   .where(self._eq(T.agent_name, "agent"), T.id >= marker("low")))
            if high is not None:
                query = query.where(T.id < marker("high"))
            if after is not None:
                query = query.where(T.id > marker("after"))
            return query.order_by(T.id).limit(marker("limit"))

        values = {"agent": agent, "low": low, "high": high, "after": after, "limit": limit + 1}
        rows = self._rows(("id prefix", high is None, after is None), build, values)
        more = len(rows) > limit
        rows = rows[:limit]
        # The range's order is the column's: on MySQL it may hold the prefix without its trailing
        # spaces too (PAD SPACE), so each id is checked here (Python compares by code point).
        found = [{"id": i, "title": title, "scope": scope, "createdAt": self._ms(c), "updatedAt": self._ms(u)}
                 for i, title, scope, c, u in rows if i.startswith(prefix)]
        return found, rows[-1][0] if more else None

    def _title_matches(self, agent: str, prefix: str, before: Optional[Tuple[int, str]], limit: int,
                       scan: int) -> Tuple[List[Dict[str, Any]], Optional[Tuple[int, str]]]:
        """Up to `limit` threads of `agent` whose title starts with `prefix` (case-folded) and whose
        id does not (those are the id matches), examining at most `scan` threads after `before`."""
        found: List[Dict[str, Any]] = []
        folded = prefix.casefold()
        examined, cursor = 0, before
        while examined < scan and len(found) < limit:
            page = self.threads(agent, cursor, limit=min(500, scan - examined))
            examined += len(page)
            found += [thread for thread in page if (thread.get("title") or "").casefold().startswith(folded)
                      and not thread["id"].startswith(prefix)]
            if not page:
                return found[:limit], None
            cursor = (page[-1]["updatedAt"], page[-1]["id"])
        return found[:limit], cursor

    def messages(self, thread_id: str, before: Optional[Tuple[int, str]] = None,
                 limit: int = MESSAGES_PAGE) -> List[Dict[str, Any]]:
        """The last `limit` messages of the thread before the key (createdAt, key), oldest first."""
        M = self.m.message

        def build() -> peewee.Query:
            query: peewee.Query = (M.select(M.id, M.run_id, M.created_at, self.dialect.select_json(M.message))
                                   .where(M.thread == marker("thread")))
            if before is not None:
                query = query.where(M.created_at <= marker("at"),
                                    (M.created_at < marker("at")) | (M.id < marker("key")))
            return query.order_by(M.created_at.desc(), M.id.desc()).limit(marker("limit"))

        values: Dict[str, Any] = {"thread": thread_id, "limit": limit}
        if before is not None:
            values.update(at=self._ts(before[0]), key=before[1])
        out = []
        for key, run_id, created, body in reversed(self._rows(("messages", before is None), build, values)):
            message = self._json(body)
            out.append({"key": key, "runId": run_id, "createdAt": self._ms(created),
                        "message": message if isinstance(message, dict) else {"content": message}})
        return out

    def thread_runs(self, thread_id: str, since_ms: Optional[int], limit: int = PAGE) -> List[RunRow]:
        """The thread's newest `limit` runs started at or after `since_ms`, oldest first."""
        R = self.m.run

        def build() -> peewee.Query:
            query: peewee.Query = R.select(*self._run_columns()).where(self._eq(R.thread_id, "thread"))
            if since_ms is not None:
                query = query.where(R.started_at >= marker("since"))
            return query.order_by(R.started_at.desc()).limit(marker("limit"))

        values = {"thread": thread_id, "limit": limit,
                  "since": None if since_ms is None else self._ts(since_ms)}
        return list(reversed(self._run_rows(self._rows(("thread runs", since_ms is None), build, values))))
