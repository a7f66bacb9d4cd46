"""The inspector's statement machinery, shared by its reads (overview_reads, thread_reads, run_reads).

Each statement is built with peewee once per shape with `marker`s for its values and cached
per `Statements` object; lists are keyset pages merged from bounded arms (`Statements._keyset`).
The constants are the bounds every page's statements keep to.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, cast

import peewee

from ..query import Statement, compile_statement, marker

__all__ = ["Statements", "RunRow", "COUNT_CAP", "PAGE", "EVENTS_PAGE", "MESSAGES_PAGE", "MAX_AGENTS",
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


class Statements:
    """Compiled statements over one storage (its executor and models), and what reads share.

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

    def _json(self, value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def _run_columns(self) -> List[peewee.Field]:
        R = self.m.run
        return [R.run_id, R.agent_name, R.thread_id, R.status, R.started_at, R.updated_at, R.finished_at]

    def _run_rows(self, rows: Sequence[Tuple[Any, ...]]) -> List[RunRow]:
        return [RunRow(r[0], r[1], r[2], r[3], self._ms(r[4]) or 0, self._ms(r[5]), self._ms(r[6]))
                for r in rows]

    def _keyset(self, shape: Tuple[Any, ...], bases: Callable[[], List[peewee.Query]],
                values: Dict[str, Any], at: peewee.Field, key: peewee.Field,
                before: Optional[Tuple[int, str]], limit: int) -> List[Tuple[Any, ...]]:
        """The first `limit` rows of the `bases` (each selecting `at`, `key` first) in (at, key)
        descending order after `before`, the time decoded to ms.

        Each base is read in `at` order only (its index: a leading equality, then `at`), so no
        planner is tempted to walk another index to save a sort; rows sharing a timestamp are
        put in key order here, reading the whole group (a one-millisecond range of the same index)
        where a page boundary falls inside one and a range may have stopped in it. (Ranges, not
        equality: a timestamp stored with microseconds reads as its millisecond.) Only the page's
        times are decoded: the rest are compared as the driver returns them, in the index's order.
        """
        def arms(mode: str, bound: Dict[str, Any]) -> List[Tuple[Any, ...]]:
            def build() -> List[peewee.Query]:
                numbered = [cast(peewee.Select, b).select_extend(peewee.SQL(str(i)).alias("arm"))
                            for i, b in enumerate(bases())]
                if mode == "first":
                    return [b.order_by(at.desc()).limit(marker("limit")) for b in numbered]
                if mode == "before":
                    return [b.where(at < marker("cut")).order_by(at.desc()).limit(marker("limit"))
                            for b in numbered]
                if mode == "ties":
                    return [b.where(at >= marker("cut"), at < marker("cut_end"), key < marker("last"))
                            for b in numbered]
                # "group": every row of one millisecond
                return [b.where(at >= marker("cut"), at < marker("cut_end")) for b in numbered]

            return self._rows((*shape, mode), build, {**values, **bound, "limit": limit})

        if before is None:
            limited = rows = arms("first", {})
        else:
            cut, last = before
            bound = {"cut": self._ts(cut), "cut_end": self._ts(cut + 1), "last": last}
            limited = arms("before", bound)
            rows = limited + arms("ties", bound)
        page, edge, tied = self._page(rows, limit)
        if edge is not None and self._stopped_at(limited, limit, edge):
            # A range stopped inside the page's last millisecond: read that millisecond whole.
            tied = [(self._ms(r[0]) or 0, *r[1:]) for r in arms("group", {"cut": self._ts(edge),
                                                                         "cut_end": self._ts(edge + 1)})]
            if before is not None and edge == before[0]:
                tied = [r for r in tied if r[1] < before[1]]
        rows = page + sorted(tied, key=lambda r: r[1], reverse=True)
        return [r[:-1] for r in rows[:limit]]  # (the arm's number dropped)

    def _page(self, rows: List[Tuple[Any, ...]], limit: int) -> Tuple[List[Tuple[Any, ...]], Optional[int],
                                                                        List[Tuple[Any, ...]]]:
        """(the first rows by (at, key) descending whose millisecond is wholly inside the first
        `limit`, that last millisecond or None if every row is in, the rows read of it)."""
        try:  # a later stored time is a later millisecond or the same one: no decoding needed to sort
            rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        except TypeError:  # times of several types in one SQLite column: decode them all first
            rows = sorted(((self._ms(r[0]) or 0, *r[1:]) for r in rows), key=lambda r: (r[0], r[1]),
                          reverse=True)
        decoded = [(self._ms(r[0]) or 0, *r[1:]) for r in rows[:limit]]
        if len(rows) < limit:
            return sorted(decoded, key=lambda r: (r[0], r[1]), reverse=True), None, []
        edge = min(r[0] for r in decoded)
        tied = [r for r in decoded if r[0] == edge]
        for r in rows[limit:]:  # the edge's millisecond continues past the limit: those rows too
            ms = self._ms(r[0]) or 0
            if ms != edge:
                break
            tied.append((ms, *r[1:]))
        page = sorted((r for r in decoded if r[0] != edge), key=lambda r: (r[0], r[1]), reverse=True)
        return page, edge, tied

    def _stopped_at(self, limited: List[Tuple[Any, ...]], limit: int, edge: int) -> bool:
        """Whether a range read with LIMIT `limit` (its number last in each row) came back full
        with its oldest row in millisecond `edge` (it may have more rows there)."""
        per_arm: Dict[Any, List[Any]] = {}
        for r in limited:
            per_arm.setdefault(r[-1], []).append(r[0])
        for times in per_arm.values():
            if len(times) >= limit:
                try:
                    oldest = self._ms(min(times))
                except TypeError:  # (several types in one SQLite column)
                    oldest = min(self._ms(t) or 0 for t in times)
                if oldest == edge:
                    return True
        return False
