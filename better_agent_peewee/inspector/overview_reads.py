"""What the overview reads: agents, their capped counts, and the bounded samples its charts draw."""
from __future__ import annotations

from typing import Any, Dict, List

import peewee

from ..query import marker
from ..records import RUN_STATUSES
from .statements import CHART_CAP, COUNT_CAP, DURATION_SAMPLE, MAX_AGENTS, PAGE, RunRow, Statements

__all__ = ["OverviewReads"]

_COUNT = peewee.fn.COUNT(peewee.SQL("*"))
_FINISHED = tuple(s for s in RUN_STATUSES if s != "running")


class OverviewReads(Statements):
    """Agents (a skip scan per name), counts stopping at a cap, chart samples, running runs."""

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
