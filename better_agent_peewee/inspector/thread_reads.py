"""What the thread pages read: an agent's threads (paged, searched), a thread's messages and runs."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import peewee

from ..query import marker
from .statements import MESSAGES_PAGE, PAGE, TITLE_SCAN, RunRow, Statements

__all__ = ["ThreadReads"]


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

    def search_threads(self, agent: str, prefix: str, before: Optional[Tuple[int, str]] = None,
                       limit: int = PAGE, scan: int = TITLE_SCAN) -> Tuple[List[Dict[str, Any]], Optional[
                           Tuple[int, str]]]:
        """Threads of `agent` whose id is `prefix`, or whose title starts with it (case-folded),
        examining at most `scan` threads after `before`; returns (matches, where to go on or None)."""
        found: List[Dict[str, Any]] = []
        if before is None:
            exact = self.storage.memory.threads.get(prefix)
            if exact is not None and exact.get("agentName") == agent:
                found.append(exact)
        folded = prefix.casefold()
        examined, cursor = 0, before
        while examined < scan and len(found) < limit:
            page = self.threads(agent, cursor, limit=min(500, scan - examined))
            examined += len(page)
            for thread in page:
                if (thread.get("title") or "").casefold().startswith(folded) and thread["id"] != prefix:
                    found.append(thread)
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
