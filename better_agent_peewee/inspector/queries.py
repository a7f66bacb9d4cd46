"""What the inspector reads, each statement an index lookup bounded by a page size or a cap.

No page counts or scans a whole table: an agent list is a skip scan of an index (one short
index probe per agent), counts stop at `COUNT_CAP` (shown as "1,000+"), charts and
percentiles read a bounded sample of the newest runs per agent and status, and every list
is a keyset page (``WHERE key < last ORDER BY key DESC LIMIT page``) of an index whose
leading columns are the filter. tests/test_inspector_explain.py EXPLAINs each statement.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import peewee

from ..query import Statement, compile_statement, marker
from ..records import RUN_STATUSES

__all__ = ["Reader", "RunRow", "COUNT_CAP", "PAGE", "EVENTS_PAGE", "MESSAGES_PAGE", "MAX_AGENTS",
           "CHART_CAP", "DURATION_SAMPLE", "TITLE_SCAN"]

#: Rows per page of threads and runs.
PAGE = 50
#: Messages per page of a thread.
MESSAGES_PAGE = 100
#: Events per page of a run's timeline.
EVENTS_PAGE = 500
#: Agents the overview and the unfiltered runs list look at.
MAX_AGENTS = 50
#: Counts stop here (a count of a million runs would read a million index entries).
COUNT_CAP = 1000
#: Runs per agent and status the hourly charts read (the newest first).
CHART_CAP = 500
#: Finished runs per agent and status the duration percentiles read (the newest first).
DURATION_SAMPLE = 100
#: Threads one title search examines per page (newest first), matches or not.
TITLE_SCAN = 2000

_COUNT = peewee.fn.COUNT(peewee.SQL("*"))
_FINISHED = tuple(s for s in RUN_STATUSES if s != "running")


class RunRow(NamedTuple):
    """A run as lists show it."""

    run_id: str
    agent_name: str
    thread_id: Optional[str]
    status: str
    started_at: int
    updated_at: Optional[int]
    finished_at: Optional[int]

    @property
    def duration_ms(self) -> Optional[int]:
        """Finished minus started, or None while running."""
        return None if self.finished_at is None else self.finished_at - self.started_at


class Reader:
    """The inspector's statements over one storage (its executor and models).

    Each statement is built with peewee once per shape (the number of arms, which filters) with
    `marker`s for its values, and cached: a page binds values into compiled SQL, as the
    library's own lookups do (building queries per call costs more than running them).
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.executor = storage.executor
        self.dialect = storage.executor.dialect
        self.db: peewee.Database = storage.database
        self.m = storage.models
        self._compiled: Dict[Tuple[Any, ...], Statement] = {}
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------------------

    def _ms(self, value: Any) -> Optional[int]:
        if value is None or isinstance(value, int):
            return value
        ms: int = self.dialect.decode_ts(value)
        return ms

    def _ts(self, ms: int) -> Any:
        """Epoch ms as the dialect binds a timestamp (markers skip peewee's converters)."""
        return self.dialect.encode_ts(ms)

    def _eq(self, column: peewee.Field, name: str) -> Any:
        return self.dialect.text_equals(column, marker(name))

    def _rows(self, shape: Tuple[Any, ...], build: Callable[[], Any], values: Dict[str, Any]) -> List[Any]:
        """Rows of the statement of `shape` (compiled from ``build()`` the first time) for `values`."""
        statement = self._compiled.get(shape)
        if statement is None:
            built = build()
            statement = self._union(built) if isinstance(built, list) else compile_statement(self.db, built)
            with self._lock:
                self._compiled[shape] = statement
        return list(self.executor.execute(statement.sql, statement.params(values),
                                          idempotent=True).fetchall())

    def _union(self, arms: Sequence[peewee.Query]) -> Statement:
        """``SELECT * FROM (arm) UNION ALL ...``: several bounded arms in one round trip."""
        parts: List[str] = []
        plan: List[Any] = []
        for i, arm in enumerate(arms):
            compiled = compile_statement(self.db, arm)
            parts.append(f"SELECT * FROM ({compiled.sql}) AS a{i}")
            plan.extend(compiled.plan)
        return Statement(" UNION ALL ".join(parts), tuple(plan), None)

    # -- agents and counts ------------------------------------------------------------------

    def agents(self, limit: int = MAX_AGENTS) -> List[str]:
        """Agent names (of runs and of threads), in code point order: an index probe per name."""
        names = set(self._distinct(self.m.run, self.m.run.agent_name, limit))
        names.update(self._distinct(self.m.thread, self.m.thread.agent_name, limit))
        return sorted(names)[:limit]

    def _distinct(self, model: Any, column: peewee.Field, limit: int) -> List[str]:
        found: List[str] = []
        # A range even for the first (every string is >= ''): an index seek, not a scan.
        first = model.select(column).where(column >= marker("after")).order_by(column).limit(1)
        after = model.select(column).where(column > marker("after")).order_by(column).limit(1)
        while len(found) < limit:
            rows = self._rows(("distinct", model, bool(found)), lambda: after if found else first,
                              {"after": found[-1] if found else ""})
            if not rows:
                break
            found.append(rows[0][0])
        return found

    def agent_counts(self, agent: str, cap: int = COUNT_CAP) -> Dict[str, int]:
        """``{"threads": n, <status>: n, ...}`` for `agent`, each count stopping at `cap` + 1."""
        R, T = self.m.run, self.m.thread

        def build() -> peewee.Query:
            arms: List[Any] = [T.select(peewee.SQL("1")).where(self._eq(T.agent_name, "agent"))]
            arms += [R.select(peewee.SQL("1")).where(self._eq(R.agent_name, "agent"), R.status == status)
                     for status in RUN_STATUSES]
            columns = [peewee.Select(from_list=[arm.limit(marker("cap")).alias(f"c{i}")], columns=[_COUNT])
                       for i, arm in enumerate(arms)]
            return peewee.Select(columns=columns)

        (row,) = self._rows(("counts",), build, {"agent": agent, "cap": cap + 1})
        return dict(zip(("threads",) + RUN_STATUSES, (int(n) for n in row)))

    def recent_starts(self, agent: str, since_ms: int, cap: int = CHART_CAP) -> Dict[str, List[int]]:
        """Start times (ms) of `agent`'s runs since `since_ms`, per status, newest `cap` of each."""
        R = self.m.run

        def build() -> List[peewee.Query]:
            return [R.select(R.status, R.started_at)
                    .where(self._eq(R.agent_name, "agent"), R.status == status,
                           R.started_at >= marker("since"))
                    .order_by(R.started_at.desc()).limit(marker("cap")) for status in RUN_STATUSES]

        found: Dict[str, List[int]] = {s: [] for s in RUN_STATUSES}
        for status, started in self._rows(("starts",), build, {"agent": agent, "since": self._ts(since_ms),
                                                               "cap": cap}):
            found[status].append(self._ms(started) or 0)
        return found

    def recent_durations(self, agent: str, sample: int = DURATION_SAMPLE) -> List[int]:
        """Durations (ms) of `agent`'s newest finished runs: `sample` of each final status, the
        newest `sample` of those."""
        R = self.m.run

        def build() -> List[peewee.Query]:
            return [R.select(R.started_at, R.finished_at)
                    .where(self._eq(R.agent_name, "agent"), R.status == status)
                    .order_by(R.started_at.desc()).limit(marker("cap")) for status in _FINISHED]

        started = [(self._ms(s) or 0, f) for s, f in self._rows(("durations",), build,
                                                                 {"agent": agent, "cap": sample})]
        started.sort(key=lambda r: r[0], reverse=True)
        spans = [(s, self._ms(f)) for s, f in started[:sample]]  # (only the kept ones' ends decoded)
        return [f - s for s, f in spans if f is not None]

    def running(self, limit: int = PAGE) -> List[RunRow]:
        """Running runs, the least recently updated first (the stale-looking ones lead)."""
        R = self.m.run
        rows = self._rows(("running",), lambda: R.select(*self._run_columns()).where(R.status == "running")
                          .limit(marker("limit")), {"limit": limit})
        return sorted(self._run_rows(rows), key=lambda r: r.updated_at or 0)

    def _run_columns(self) -> List[peewee.Field]:
        R = self.m.run
        return [R.run_id, R.agent_name, R.thread_id, R.status, R.started_at, R.updated_at, R.finished_at]

    def _run_rows(self, rows: Sequence[Tuple[Any, ...]]) -> List[RunRow]:
        return [RunRow(r[0], r[1], r[2], r[3], self._ms(r[4]) or 0, self._ms(r[5]), self._ms(r[6]))
                for r in rows]

    # -- threads ----------------------------------------------------------------------------

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

    def _keyset(self, shape: Tuple[Any, ...], bases: Callable[[], List[peewee.Query]],
                values: Dict[str, Any], at: peewee.Field, key: peewee.Field,
                before: Optional[Tuple[int, str]], limit: int) -> List[Tuple[Any, ...]]:
        """The first `limit` rows of the `bases` (each selecting `at`, `key` first) in (at, key)
        descending order after `before`, the time decoded to ms.

        Each base is read in `at` order only (its index: a leading equality, then `at`), so no
        planner is tempted to walk another index to save a sort; rows sharing a timestamp are
        put in key order here, reading the whole group (a one-millisecond range of the same index)
        where a page boundary falls inside one. (Ranges, not equality: a timestamp stored with
        microseconds reads as its millisecond.)
        """
        def arms(mode: str, bound: Dict[str, Any]) -> List[Tuple[Any, ...]]:
            def build() -> List[peewee.Query]:
                if mode == "first":
                    return [b.order_by(at.desc()).limit(marker("limit")) for b in bases()]
                if mode == "before":
                    return [b.where(at < marker("cut")).order_by(at.desc()).limit(marker("limit"))
                            for b in bases()]
                if mode == "ties":
                    return [b.where(at >= marker("cut"), at < marker("cut_end"), key < marker("last"))
                            for b in bases()]
                # "group": every row of one millisecond
                return [b.where(at >= marker("cut"), at < marker("cut_end")) for b in bases()]

            rows = self._rows((*shape, mode), build, {**values, **bound, "limit": limit})
            return [(self._ms(r[0]) or 0, *r[1:]) for r in rows]

        if before is None:
            rows = arms("first", {})
        else:
            cut, last = before
            bound = {"cut": self._ts(cut), "cut_end": self._ts(cut + 1), "last": last}
            rows = arms("before", bound) + arms("ties", bound)
        rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        if len(rows) >= limit:
            edge = rows[limit - 1][0]  # the group at the page's edge may be cut short: read it whole
            group = arms("group", {"cut": self._ts(edge), "cut_end": self._ts(edge + 1)})
            if before is not None and edge == before[0]:
                group = [r for r in group if r[1] < before[1]]
            rows = [r for r in rows if r[0] != edge] + group
            rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return rows[:limit]

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

    def _json(self, value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

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

    # -- runs -------------------------------------------------------------------------------

    def runs(self, agents: Sequence[str], statuses: Sequence[str], since_ms: Optional[int] = None,
             until_ms: Optional[int] = None, before: Optional[Tuple[int, str]] = None,
             limit: int = PAGE) -> List[RunRow]:
        """A page of runs, newest start first: one index range per (agent, status), merged."""
        R = self.m.run
        pairs = [(a, s) for a in agents for s in statuses]

        def bases() -> List[peewee.Query]:
            out = []
            for i in range(len(pairs)):
                query = (R.select(R.started_at, R.run_id, R.agent_name, R.thread_id, R.status, R.updated_at,
                                  R.finished_at)
                         .where(self._eq(R.agent_name, f"agent{i}"), R.status == marker(f"status{i}")))
                if since_ms is not None:
                    query = query.where(R.started_at >= marker("since"))
                if until_ms is not None:
                    query = query.where(R.started_at < marker("until"))
                out.append(query)
            return out

        values: Dict[str, Any] = {"since": None if since_ms is None else self._ts(since_ms),
                                  "until": None if until_ms is None else self._ts(until_ms)}
        for i, (agent, status) in enumerate(pairs):
            values[f"agent{i}"], values[f"status{i}"] = agent, status
        shape = ("runs", len(pairs), since_ms is None, until_ms is None)
        return [RunRow(r[1], r[2], r[3], r[4], r[0], self._ms(r[5]), self._ms(r[6]))
                for r in self._keyset(shape, bases, values, R.started_at, R.run_id, before, limit)]

    def events(self, run_id: str, after_seq: int = 0, limit: int = EVENTS_PAGE) -> List[Dict[str, Any]]:
        """Events of the run's stream after `after_seq`, in seq order, at most `limit`."""
        E = self.m.stream_event

        def build() -> peewee.Query:
            query: peewee.Query = (E.select(E.seq, E.timestamp, self.dialect.select_json(E.event))
                                   .where(E.run_id == marker("run"), E.seq > marker("after")))
            return query.order_by(E.seq).limit(marker("limit"))

        out = []
        values = {"run": run_id, "after": after_seq, "limit": limit}
        for seq, stamp, body in self._rows(("events",), build, values):
            event = self._json(body)
            out.append({"seq": int(seq), "timestamp": self._ms(stamp),
                        "event": event if isinstance(event, dict) else {"value": event}})
        return out
