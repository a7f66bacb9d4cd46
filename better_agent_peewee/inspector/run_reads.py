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
                # The keys only: the page's rows are read by id after (`_by_id`), 50 rows, not 50 per range.
                query = (R.select(R.started_at, R.run_id)
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
        for _ in range(2):  # a run deleted between the two reads (a prune): pick the page again, once
            keys = self._keyset(shape, bases, values, R.started_at, R.run_id, before, limit)
            found = self._by_id([run_id for _, run_id in keys])
            if len(found) == len(keys):
                break
        return [found[run_id] for _, run_id in keys if run_id in found]

    def _by_id(self, run_ids: List[str]) -> Dict[str, RunRow]:
        """The runs of `run_ids` (a unique index probe each), by id."""
        if not run_ids:
            return {}
        R = self.m.run
        rows = self._rows(("runs by id", len(run_ids)),
                          lambda: R.select(*self._run_columns()).where(
                              R.run_id.in_([marker(f"id{i}") for i in range(len(run_ids))])),
                          {f"id{i}": run_id for i, run_id in enumerate(run_ids)})
        return {r.run_id: r for r in self._run_rows(rows) if r.run_id in run_ids}

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
