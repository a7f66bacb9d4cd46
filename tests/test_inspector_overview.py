"""The overview's figures as the database computes them, on the three dialects: each run counted in
its own hour at the hour's edges, durations to the millisecond, the "partly counted" mark where a
status's newest runs fill the cap; and the unfiltered runs list's keyset pages across runs that
share a start time (its page is picked from the keys, then read by id)."""

from __future__ import annotations

import random
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import peewee
import pytest

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.inspector import inspector_app
from better_agent_peewee.inspector.charts import percentile
from better_agent_peewee.inspector.markup import duration, iso
from better_agent_peewee.inspector.queries import CHART_CAP, Reader
from tests.test_inspector import call

HOUR = 3_600_000


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def _run(storage: Any, run_id: str, agent: str, status: str, started: int, took: Optional[int]) -> None:
    record: Dict[str, Any] = {"runId": run_id, "agentName": agent, "status": status, "startedAt": started,
                              "updatedAt": started}
    if took is not None:
        record.update(finishedAt=started + took, updatedAt=started + took,
                      finalEvent={"type": "RUN_FINISHED", "runId": run_id})
    storage.set("runs", run_id, record)


def test_each_run_is_counted_in_its_own_hour_and_lasts_to_the_millisecond(storage: Any) -> None:
    h = int(time.time() * 1000) // HOUR - 2  # an hour of the last 24 (charted in both charts)
    runs: List[Tuple[int, str, int]] = [  # (start, status, duration ms)
        (h * HOUR - 1, "completed", 1),  # the last millisecond of the hour before
        (h * HOUR, "completed", 0),  # the hour's first millisecond
        (h * HOUR + 1, "completed", 999),
        ((h + 1) * HOUR - 1, "failed", 1000),  # its last
        ((h + 1) * HOUR, "failed", HOUR + 1),  # the next one's first
        ((h - 100) * HOUR, "aborted", 86_400_007),  # four days earlier: the 7-day chart only
        ((h - 100) * HOUR - 1, "aborted", 59_999),
    ]
    with storage.transaction():
        for i, (at, status, took) in enumerate(runs):
            _run(storage, f"clock-{i}", "clock", status, at, took)
        _run(storage, "clock-live", "clock", "running", h * HOUR + 30 * 60_000, None)
    expected: Dict[str, Dict[int, int]] = {}
    for at, status, _ in runs + [(h * HOUR + 30 * 60_000, "running", 0)]:
        into = expected.setdefault(status, {})
        into[at // HOUR] = into.get(at // HOUR, 0) + 1
    (hours,) = Reader(storage).hours(["clock"], (h - 150) * HOUR)
    assert {s: c for s, c in hours.counts.items() if c} == expected
    assert hours.partial_before is None
    spans = [took for _, _, took in runs]
    (durations,) = Reader(storage).durations(["clock"])
    assert sorted(durations) == sorted(spans)

    page = call(inspector_app(storage), "GET", "/")
    assert page.code == 200
    for status, counted in expected.items():
        for hour, n in counted.items():  # each bar's tooltip: "<hour start> UTC: <n> <status>"
            assert f"<title>{iso(hour * HOUR)} UTC: {n} {status}</title>" in page.text, (status, hour)
    assert f"p50 {duration(percentile(spans, 50))} · p95 {duration(percentile(spans, 95))}" in page.text
    assert "partly counted" not in page.text


def test_a_status_whose_newest_runs_fill_the_cap_is_marked_partly_counted(storage: Any) -> None:
    now = int(time.time() * 1000)
    h = now // HOUR
    with storage.transaction():
        for i in range(CHART_CAP + 1):  # one more than the chart reads, three a minute over 2.8 hours
            _run(storage, f"many-{i:04d}", "busy", "completed", now - 60_000 - i * 20_000, 500)
        _run(storage, "few-0", "quiet", "failed", (h - 30) * HOUR, 500)
    reader = Reader(storage)
    busy, quiet = reader.hours(["busy", "quiet"], (h - 167) * HOUR)
    # Partly counted: the hour of the oldest start read, and every hour before it.
    oldest_read = now - 60_000 - (CHART_CAP - 1) * 20_000
    assert busy.partial_before == (oldest_read // HOUR + 1) * HOUR and quiet.partial_before is None
    assert sum(busy.counts["completed"].values()) == CHART_CAP
    assert quiet.counts["failed"] == {h - 30: 1}
    small, _ = reader.hours(["busy", "quiet"], (h - 167) * HOUR, cap=3)
    assert small.partial_before == ((now - 60_000 - 2 * 20_000) // HOUR + 1) * HOUR
    page = call(inspector_app(storage), "GET", "/")
    assert f"hours before {iso(busy.partial_before)} UTC are partly counted" in page.text
    # ... drawn pale: the bars of those hours, and only those.
    pale = {m for m in re.findall(r'class="s-completed sampled"><title>([^<]+) UTC', page.text)}
    whole = {m for m in re.findall(r'class="s-completed"><title>([^<]+) UTC', page.text)}
    assert pale and whole and max(pale) < iso(busy.partial_before) <= min(whole)


def test_runs_pages_across_shared_start_times_keep_every_run_once_in_order(storage: Any) -> None:
    t = 1_700_000_000_000
    runs = []
    for i in range(30):  # 3 agents x 2 statuses; most share one millisecond, some around it
        at = t if i % 5 else t + (i % 3) - 1
        runs.append((at, f"r-{i:02d}", f"agent-{i % 3}", ("completed", "failed")[i // 15]))
    # Stored in no key order, so the index's order among equal times is not the ids' order either.
    with storage.transaction():
        for at, run_id, agent, status in random.Random(5).sample(runs, len(runs)):
            _run(storage, run_id, agent, status, at, 10)
    reader = Reader(storage)
    expected = sorted(((at, run_id) for at, run_id, _, _ in runs), reverse=True)
    agents, statuses = ["agent-0", "agent-1", "agent-2"], ["completed", "failed", "running"]
    for limit in (1, 2, 4, 7, 30, 31):
        seen: List[Tuple[int, str]] = []
        before: Optional[Tuple[int, str]] = None
        while True:
            page = reader.runs(agents, statuses, before=before, limit=limit)
            seen += [(r.started_at, r.run_id) for r in page]
            assert all(r.agent_name == f"agent-{int(r.run_id[2:]) % 3}" for r in page)  # the rows read by id
            if len(page) < limit:
                break
            before = seen[-1]
        assert seen == expected, limit
