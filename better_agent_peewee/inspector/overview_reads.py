"""What the overview reads: agents, their capped counts, and the bounded samples its charts draw.

Every agent's figures come in one statement per kind (counts, hours, durations), a UNION ALL
of one bounded arm per agent and status: the same index ranges, capped, as one statement per
agent would read, in three round trips instead of thirty. The database counts the runs per
hour and subtracts the timestamps (`Dialect.hour_number`, `Dialect.milliseconds_between`), so
no timestamp comes back to be decoded here but the oldest one of a capped range.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import peewee

from ..query import marker
from ..records import RUN_STATUSES
from .statements import CHART_CAP, COUNT_CAP, DURATION_SAMPLE, MAX_AGENTS, PAGE, RunRow, Statements

__all__ = ["OverviewReads", "Hours"]

_COUNT = peewee.fn.COUNT(peewee.SQL("*"))
_FINISHED = tuple(s for s in RUN_STATUSES if s != "running")
HOUR = 3_600_000


class Hours(NamedTuple):
    """Runs per hour of one agent: ``{status: {hour number: runs}}`` (hour number: its start //
    3,600,000 ms); and where a status's newest runs filled the cap, the end (ms) of the oldest
    hour they reach into: the hours before it are only partly counted. Else None."""

    counts: Dict[str, Dict[int, int]]
    partial_before: Optional[int]


class OverviewReads(Statements):
    """Agents (a skip scan per name), counts stopping at a cap, chart samples, running runs."""

    def agents(self, limit: int = MAX_AGENTS) -> List[str]:
        """Agent names (of runs and of threads), in code point order: an index probe per name
        and table, both tables' next name in one statement."""
        found: List[str] = []
        R, T = self.m.run, self.m.thread

        def build(first: bool) -> peewee.Query:
            # A range even for the first (every string is >= ''): an index seek each, not a scan.
            def probe(model: Any, column: peewee.Field) -> Any:
                after = column >= marker("after") if first else column > marker("after")
                return model.select(column.alias("name")).where(after).order_by(column).limit(1)

            arms = [peewee.Select(from_list=[probe(model, column).alias(f"a{j}")], columns=[peewee.SQL("*")])
                    for j, (model, column) in enumerate(((R, R.agent_name), (T, T.agent_name)))]
            # The smaller of the two by the database's own order, as each probe's `>` compares.
            names = arms[0].union_all(arms[1]).alias("names")
            return peewee.Select(from_list=[names], columns=[peewee.fn.MIN(names.c.name)])

        while len(found) < limit:
            ((name,),) = self._rows(("agents", not found), lambda: build(not found),
                                    {"after": found[-1] if found else ""})
            if name is None:
                break
            found.append(name)
        return sorted(found)

    def agent_counts(self, agents: Sequence[str], cap: int = COUNT_CAP) -> List[Dict[str, int]]:
        """Per agent, ``{"threads": n, <status>: n, ...}``, each count stopping at `cap` + 1."""
        if not agents:
            return []
        R, T = self.m.run, self.m.thread

        def counts(i: int) -> peewee.Query:
            arms: List[Any] = [T.select(peewee.SQL("1")).where(self._eq(T.agent_name, f"agent{i}"))]
            arms += [R.select(peewee.SQL("1")).where(self._eq(R.agent_name, f"agent{i}"), R.status == status)
                     for status in RUN_STATUSES]
            columns = [peewee.Select(from_list=[arm.limit(marker("cap")).alias(f"c{j}")], columns=[_COUNT])
                       .alias(f"n{j}") for j, arm in enumerate(arms)]
            return peewee.Select(columns=[peewee.SQL(str(i)).alias("agent"), *columns])

        values: Dict[str, Any] = {f"agent{i}": agent for i, agent in enumerate(agents)}
        found: List[Dict[str, int]] = [{} for _ in agents]
        every = range(len(agents))
        for row in self._rows(("counts", len(agents)), lambda: _union_all([counts(i) for i in every]),
                              {**values, "cap": cap + 1}):
            found[int(row[0])] = dict(zip(("threads",) + RUN_STATUSES, (int(n) for n in row[1:])))
        return found

    def hours(self, agents: Sequence[str], since_ms: int, cap: int = CHART_CAP) -> List[Hours]:
        """Per agent, its runs started since `since_ms` per status and hour, counted over the
        newest `cap` of each status (an index range each, grouped by the database)."""
        if not agents:
            return []
        R = self.m.run

        def arm(i: int, status: str) -> peewee.Query:
            # The hour worked out inside the capped range (once a row), grouped outside it.
            newest = (R.select(self.dialect.hour_number(R.started_at).alias("hour"))
                      .where(self._eq(R.agent_name, f"agent{i}"), R.status == status,
                             R.started_at >= marker("since"))
                      .order_by(R.started_at.desc()).limit(marker("cap")).alias("newest"))
            number = peewee.SQL(str(i * len(RUN_STATUSES) + RUN_STATUSES.index(status))).alias("arm")
            return peewee.Select(from_list=[newest], columns=[number, newest.c.hour.alias("hour"),
                                                               _COUNT.alias("n")]).group_by(newest.c.hour)

        values: Dict[str, Any] = {f"agent{i}": agent for i, agent in enumerate(agents)}
        rows = self._rows(("hours", len(agents)), lambda: _union_all([arm(i, s) for i in range(len(agents))
                                                                      for s in RUN_STATUSES]),
                          {**values, "since": self._ts(since_ms), "cap": cap})
        ranges: List[Dict[int, int]] = [{} for _ in range(len(agents) * len(RUN_STATUSES))]
        for number, hour, n in rows:
            if hour is not None:  # (a time the database could not read: left out)
                ranges[number][int(hour)] = int(n)
        out = []
        for i in range(len(agents)):
            counts = dict(zip(RUN_STATUSES, ranges[i * len(RUN_STATUSES):(i + 1) * len(RUN_STATUSES)]))
            capped = [min(c) for c in counts.values() if c and sum(c.values()) >= cap]
            out.append(Hours(counts, (max(capped) + 1) * HOUR if capped else None))
        return out

    def durations(self, agents: Sequence[str], sample: int = DURATION_SAMPLE) -> List[List[int]]:
        """Per agent, the durations (ms) of its newest `sample` finished runs, subtracted by the
        database: one range per final status, merged newest first, stopped at `sample` (see
        `Dialect.limits_union_arms`); no timestamp comes back."""
        if not agents:
            return []
        R = self.m.run

        def newest(i: int) -> peewee.Query:
            arms = [R.select(R.started_at.alias("at"),
                             self.dialect.milliseconds_between(R.started_at, R.finished_at).alias("ms"))
                    .where(self._eq(R.agent_name, f"agent{i}"), R.status == status) for status in _FINISHED]
            if self.dialect.limits_union_arms:
                arms = [arm.order_by(R.started_at.desc()).limit(marker("cap")) for arm in arms]
            merged = arms[0]
            for arm in arms[1:]:
                merged = merged.union_all(arm)
            merged = merged.order_by(peewee.Entity("at").desc()).limit(marker("cap")).alias("merged")
            return peewee.Select(from_list=[merged], columns=[peewee.SQL(str(i)).alias("agent"), merged.c.ms])

        values: Dict[str, Any] = {f"agent{i}": agent for i, agent in enumerate(agents)}
        found: List[List[int]] = [[] for _ in agents]
        arms = range(len(agents))
        for agent, ms in self._rows(("durations", len(agents)), lambda: _union_all([newest(i) for i in arms]),
                                    {**values, "cap": sample}):
            if ms is not None:
                found[int(agent)].append(int(ms))
        return found

    def running(self, limit: int = PAGE) -> List[RunRow]:
        """Running runs, the least recently updated first (the stale-looking ones lead)."""
        R = self.m.run
        rows = self._rows(("running",), lambda: R.select(*self._run_columns()).where(R.status == "running")
                          .limit(marker("limit")), {"limit": limit})
        return sorted(self._run_rows(rows), key=lambda r: r.updated_at or 0)


def _union_all(arms: List[Any]) -> Any:
    """``arm UNION ALL arm ...`` as it is: arms with no ORDER BY or LIMIT of their own need no
    derived table around each (`Statements._union`'s), which MariaDB would fill once an arm."""
    merged = arms[0]
    for arm in arms[1:]:
        merged = merged.union_all(arm)
    return merged
