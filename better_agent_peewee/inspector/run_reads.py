"""What the run pages read: runs filtered by agent, status and time, and a run's events."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import peewee

from ..query import marker
from .statements import EVENTS_PAGE, PAGE, RunRow, Statements

__all__ = ["RunReads"]


class RunReads(Statements):
    """Runs, newest start first (one index range per agent and status, merged); a run's events."""

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
