"""prune_runs / reap_stale on SQLite, PostgreSQL and MariaDB.

The data is written with bulk inserts through the models (fast, and independent of the
runs/streams helpers); the results are read back through the storage verbs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from typing import Any, Dict, List, Mapping, Set, Tuple

import pytest

from bench.prune_scale import bulk_insert
from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.errors import QueryError
from better_agent_peewee.prune import PruneReport, prune_runs
from better_agent_peewee.reap import STALE_RUN_CODE, reap_stale
from better_agent_peewee.stats import stats
from better_agent_peewee.streams import Streams
from better_agent_peewee.tables import Tables

NOW = 1_700_000_000_000
HOUR = 3_600_000
DAY = 24 * HOUR
KEEP = timedelta(days=7)
CUTOFF = NOW - 7 * DAY
OLD = CUTOFF - HOUR  # finished before the cutoff: prunable
NEW = CUTOFF + HOUR  # finished after it: kept


@pytest.fixture
def storage(database: Any) -> Any:
    create_tables(database)
    return peewee_storage(database)


# -- building data ----------------------------------------------------------------------------

def add_runs(storage: Any, runs: List[Dict[str, Any]], events_per_run: int = 3,
             stream: bool = True, chunk: int = 1000) -> None:
    """Bulk-insert runs (dicts of run columns), each with an open/closed stream and events."""
    m = storage.models
    run_rows, stream_rows, event_rows = [], [], []
    for run in runs:
        started = run.get("started_at", (run.get("finished_at") or NOW) - HOUR)
        run_rows.append({"run_id": run["run_id"], "agent_name": "agent", "status": run["status"],
                         "thread_id": run.get("thread_id"), "config": None,
                         "started_at": started,
                         "updated_at": run.get("updated_at", run.get("finished_at") or started),
                         "finished_at": run.get("finished_at")})
        if stream and run.get("stream", True):
            stream_rows.append({"id": run["run_id"], "run_id": run["run_id"],
                                "status": "open" if run["status"] == "running" else "closed",
                                "created_at": started, "updated_at": started,
                                "closed_at": None if run["status"] == "running" else run.get("finished_at")})
            for seq in range(1, events_per_run + 1):
                event_rows.append({"id": f"{run['run_id']}:{seq}", "run_id": run["run_id"], "seq": seq,
                                   "timestamp": started + seq, "event": {"type": "TEXT_MESSAGE_CONTENT",
                                                                         "delta": f"e{seq}"}})
    with storage.transaction():
        for model, rows in ((m.run, run_rows), (m.stream, stream_rows), (m.stream_event, event_rows)):
            bulk_insert(storage, model, rows, chunk)


def add_stream(storage: Any, run_id: str, created_at: int, event_times: List[int]) -> None:
    """A stream (with events at `event_times`) whose run does not exist: an orphan."""
    m = storage.models
    m.stream.insert(id=run_id, run_id=run_id, status="closed", created_at=created_at,
                    updated_at=created_at, closed_at=created_at).execute()
    add_events(storage, run_id, event_times)


def add_events(storage: Any, run_id: str, event_times: List[int]) -> None:
    """Stream events (no stream row, no run row) at `event_times`."""
    storage.models.stream_event.insert_many(
        [{"id": f"{run_id}:{i}", "run_id": run_id, "seq": i, "timestamp": t, "event": {"type": "X"}}
         for i, t in enumerate(event_times, 1)]).execute()


def add_memory(storage: Any) -> None:
    """A thread and messages, some naming runs that prune removes."""
    storage.set("memoryThreads", "t1", {"id": "t1", "agentName": "agent", "createdAt": OLD - DAY,
                                        "updatedAt": OLD - DAY})
    for i, run_id in enumerate(["old-completed", "old-failed", None]):
        message = {"id": f"m{i}", "role": "user", "content": f"hello {i}", "threadId": "t1",
                   "createdAt": OLD - DAY + i}
        if run_id:
            message["runId"] = run_id
        storage.set("memoryMessages", f"t1:{OLD - DAY + i}:m{i}", message)


ALL_TABLES = ("memoryThreads", "memoryMessages", "runs", "streams", "streamEvents")


def snapshot(storage: Any, tables: Tuple[str, ...] = ALL_TABLES) -> Dict[str, Any]:
    """Every row of `tables`, as records keyed by id (order-independent)."""
    out = {}
    for name in tables:
        items = storage.list(name)["items"]
        key = {"runs": "runId", "streams": "runId"}.get(name, "id")
        out[name] = {item[key]: item for item in items}
    return out


def run_ids(storage: Any) -> Set[str]:
    return set(snapshot(storage)["runs"])


SCENARIO_RUNS = [
    {"run_id": "old-completed", "status": "completed", "finished_at": OLD, "thread_id": "t1"},
    {"run_id": "old-failed", "status": "failed", "finished_at": OLD - 30 * DAY, "thread_id": "t1"},
    {"run_id": "old-aborted", "status": "aborted", "finished_at": OLD},
    {"run_id": "old-no-stream", "status": "completed", "finished_at": OLD, "stream": False},
    {"run_id": "old-interrupted", "status": "interrupted", "finished_at": OLD},
    {"run_id": "new-completed", "status": "completed", "finished_at": NEW},
    {"run_id": "at-cutoff", "status": "completed", "finished_at": CUTOFF},  # not older: kept
    {"run_id": "old-running", "status": "running", "started_at": OLD - DAY, "updated_at": OLD},
    {"run_id": "done-no-finished-at", "status": "completed", "started_at": OLD - DAY},
]


def build_scenario(storage: Any) -> None:
    add_runs(storage, SCENARIO_RUNS)
    add_memory(storage)
    add_stream(storage, "orphan-old", OLD, [OLD, OLD + 1])            # run gone, old: deleted
    add_stream(storage, "orphan-new", NEW, [OLD, NEW])                # run gone, young stream: kept whole
    add_events(storage, "ghost-old", [OLD, OLD + 1])                  # no run, no stream, old: deleted
    add_events(storage, "ghost-new", [NEW])                           # young: kept
    add_events(storage, "ghost-mixed", [OLD, NEW])                    # only the old one goes


# Runs pruned by default, and the events/streams that go with them.
PRUNED_RUNS = {"old-completed", "old-failed", "old-aborted", "old-no-stream"}
EXPECTED = {"runs": 4, "streams": 3 + 1, "events": 3 * 3 + 2 + 2 + 1}


def expected_remaining(before: Dict[str, Any], pruned_runs: Set[str]) -> Dict[str, Set[str]]:
    gone_streams = pruned_runs | {"orphan-old"}
    gone_events = ({f"{r}:{s}" for r in pruned_runs for s in (1, 2, 3)}
                   | {"orphan-old:1", "orphan-old:2", "ghost-old:1", "ghost-old:2", "ghost-mixed:1"})
    return {
        "memoryThreads": set(before["memoryThreads"]),
        "memoryMessages": set(before["memoryMessages"]),
        "runs": set(before["runs"]) - pruned_runs,
        "streams": set(before["streams"]) - gone_streams,
        "streamEvents": set(before["streamEvents"]) - gone_events,
    }


def keys(snap: Dict[str, Any]) -> Dict[str, Set[str]]:
    return {name: set(rows) for name, rows in snap.items()}


# -- prune --------------------------------------------------------------------------------------

def test_prune_removes_exactly_old_finished_runs_their_streams_and_orphans(storage: Any) -> None:
    build_scenario(storage)
    before = snapshot(storage)
    report = prune_runs(storage, KEEP, now_ms=NOW)
    after = snapshot(storage)

    assert (report.runs, report.streams, report.events) == (EXPECTED["runs"], EXPECTED["streams"],
                                                             EXPECTED["events"])
    assert report.dry_run is False and report.cutoff_ms == CUTOFF
    assert keys(after) == expected_remaining(before, PRUNED_RUNS)
    # What remains is untouched, field for field (memory included).
    for name, rows in after.items():
        for key, record in rows.items():
            assert record == before[name][key], (name, key)
    # A second prune finds nothing more.
    again = prune_runs(storage, KEEP, now_ms=NOW)
    assert (again.runs, again.streams, again.events, again.batches) == (0, 0, 0, 0)


def test_dry_run_deletes_nothing_and_counts_what_the_real_run_deletes(storage: Any) -> None:
    build_scenario(storage)
    before = snapshot(storage)
    dry = prune_runs(storage, KEEP, now_ms=NOW, dry_run=True, batch_size=2)
    assert snapshot(storage) == before
    assert dry.dry_run and "would prune" in dry.summary()
    real = prune_runs(storage, KEEP, now_ms=NOW, batch_size=2)
    assert (dry.runs, dry.streams, dry.events) == (real.runs, real.streams, real.events)
    assert (real.runs, real.streams, real.events) == (EXPECTED["runs"], EXPECTED["streams"],
                                                      EXPECTED["events"])
    assert "pruned 4 runs, 4 streams, 14 events" in real.summary()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_small_batches_give_the_same_result(storage: Any, batch_size: int) -> None:
    build_scenario(storage)
    before = snapshot(storage)
    seen: List[Tuple[int, int, int, int]] = []
    report = prune_runs(storage, KEEP, now_ms=NOW, batch_size=batch_size,
                        progress=lambda r: seen.append((r.batches, r.runs, r.streams, r.events)))
    assert keys(snapshot(storage)) == expected_remaining(before, PRUNED_RUNS)
    assert (report.runs, report.streams, report.events) == (EXPECTED["runs"], EXPECTED["streams"],
                                                             EXPECTED["events"])
    # One progress call per batch, totals only growing.
    assert [s[0] for s in seen] == list(range(1, report.batches + 1))
    assert seen == sorted(seen) and seen[-1][1:] == (report.runs, report.streams, report.events)


def test_many_runs_in_batches(storage: Any) -> None:
    old = [{"run_id": f"old-{i:04d}", "status": ("completed", "failed", "aborted")[i % 3],
            "finished_at": OLD - i} for i in range(250)]
    keep = [{"run_id": f"keep-{i:04d}", "status": "completed", "finished_at": NEW + i} for i in range(40)]
    # Interleave ids so batches by run_id mix pruned and kept runs.
    keep += [{"run_id": f"old-{i:04d}x", "status": "interrupted", "finished_at": OLD}
             for i in range(0, 250, 10)]
    add_runs(storage, old + keep, events_per_run=2)
    dry = prune_runs(storage, KEEP, now_ms=NOW, batch_size=7, dry_run=True)
    report = prune_runs(storage, KEEP, now_ms=NOW, batch_size=7)
    assert (report.runs, report.streams, report.events) == (250, 250, 500)
    assert (dry.runs, dry.streams, dry.events, dry.batches) == (250, 250, 500, report.batches)
    assert report.batches == -(-250 // 7)
    remaining = snapshot(storage)
    assert set(remaining["runs"]) == {r["run_id"] for r in keep}
    assert set(remaining["streams"]) == {r["run_id"] for r in keep}
    assert len(remaining["streamEvents"]) == 2 * len(keep)


def test_runs_finished_in_the_same_millisecond_are_counted_once_across_batches(storage: Any) -> None:
    """Pages go oldest first (finishedAt, then runId): a dry run pages past ties exactly."""
    same = [{"run_id": f"tie-{i:02d}", "status": ("completed", "failed")[i % 2], "finished_at": OLD}
            for i in range(11)]
    later = [{"run_id": f"a-{i:02d}", "status": "completed", "finished_at": OLD + 1} for i in range(4)]
    add_runs(storage, same + later, events_per_run=1)
    dry = prune_runs(storage, KEEP, now_ms=NOW, batch_size=3, dry_run=True)
    assert (dry.runs, dry.streams, dry.events) == (15, 15, 15)
    report = prune_runs(storage, KEEP, now_ms=NOW, batch_size=3)
    assert (report.runs, report.streams, report.events) == (15, 15, 15)
    assert run_ids(storage) == set()


def test_the_old_runs_are_found_through_the_status_index_when_the_statistics_promise_many(
        storage: Any) -> None:
    """Half the runs are old but interrupted (kept), half finished but recent (kept): PostgreSQL,
    multiplying the two selectivities, expects a quarter of the table to match. The prune's
    page query must still walk bap_agent_runs_status_finished_idx, not scan the table for its
    LIMIT (the few old runs that do match lie at its end, added after ANALYZE)."""
    from bench.growth import Growth
    from tests.test_explain import recorded, whole_table_reads

    statuses = ("completed", "failed", "aborted")
    add_runs(storage, [{"run_id": f"int-{i:05d}", "status": "interrupted", "finished_at": OLD - i}
                       for i in range(3000)]
             + [{"run_id": f"new-{i:05d}", "status": statuses[i % 3], "finished_at": NEW + i}
                for i in range(3000)], events_per_run=0)
    Growth(storage, storage.dialect.name).analyze()
    add_runs(storage, [{"run_id": f"old-{i:05d}", "status": statuses[i % 3], "finished_at": OLD - i}
                       for i in range(30)], events_per_run=1)
    statements = recorded(storage, lambda: prune_runs(storage, KEEP, now_ms=NOW, orphan_scan=20))
    assert len(run_ids(storage)) == 6000
    pages = [(sql, params) for sql, params in statements
             if sql.lstrip().upper().startswith("SELECT") and "finished_at" in sql]
    assert pages
    for sql, params in pages:
        bad, plan = whole_table_reads(storage.database, storage.dialect.name, sql, params, bounded_sort=True)
        # A sort of what the index range found (the old runs of one status) is what the prune
        # deletes; what must not happen is a read of the whole table.
        bad = [finding for finding in bad if not finding.lower().startswith(("sort of", "filesort of"))]
        assert not bad, f"{bad}\n{sql}\n{plan}"


def test_include_interrupted_and_statuses(storage: Any) -> None:
    build_scenario(storage)
    before = snapshot(storage)
    only_failed = prune_runs(storage, KEEP, now_ms=NOW, statuses=["failed"])
    assert only_failed.runs == 1 and "old-failed" not in run_ids(storage)
    assert "old-completed" in run_ids(storage) and "old-interrupted" in run_ids(storage)

    report = prune_runs(storage, KEEP, now_ms=NOW, include_interrupted=True)
    assert report.runs == 4  # completed, aborted, no-stream, interrupted
    remaining = snapshot(storage)
    assert keys(remaining) == expected_remaining(before, PRUNED_RUNS | {"old-interrupted"})
    assert {"old-running", "done-no-finished-at", "new-completed", "at-cutoff"} <= set(remaining["runs"])


def test_bad_arguments_are_refused_before_anything_is_deleted(storage: Any) -> None:
    build_scenario(storage)
    before = snapshot(storage)
    with pytest.raises(QueryError, match="running"):
        prune_runs(storage, KEEP, statuses=["running"])
    with pytest.raises(QueryError, match="include_interrupted"):
        prune_runs(storage, KEEP, statuses=["interrupted"])
    with pytest.raises(QueryError, match="'done'"):
        prune_runs(storage, KEEP, statuses=["completed", "done"])
    with pytest.raises(ValueError, match="batch_size"):
        prune_runs(storage, KEEP, batch_size=0)
    with pytest.raises(ValueError, match="negative"):
        prune_runs(storage, timedelta(days=-1))
    with pytest.raises(TypeError, match="timedelta"):
        prune_runs(storage, 7)  # type: ignore[arg-type]
    assert snapshot(storage) == before


def test_the_orphan_sweep_is_bounded_and_repeated_prunes_cover_everything(storage: Any) -> None:
    """Each prune examines a window of `orphan_scan` keys (plus ten per run it pruned); a
    table bigger than the window is covered by repeated prunes; None sweeps everything."""
    for i in range(40):
        add_stream(storage, f"orphan-{i:03d}", OLD, [OLD, OLD + 1])  # stream and events, no run
        add_events(storage, f"stray-{i:03d}", [OLD])  # events alone
    first = prune_runs(storage, KEEP, now_ms=NOW, orphan_scan=5)
    assert 0 < first.streams <= 5 and first.events <= 5 * 2 + 5, first
    total = first
    for _ in range(400):
        if not storage.models.stream.select().count() and not storage.models.stream_event.select().count():
            break
        report = prune_runs(storage, KEEP, now_ms=NOW, orphan_scan=5)
        assert report.streams <= 5, report
        total.streams += report.streams
        total.events += report.events
    assert (total.streams, total.events) == (40, 40 * 2 + 40)
    assert storage.models.stream.select().count() == storage.models.stream_event.select().count() == 0

    add_stream(storage, "orphan-x", OLD, [OLD])
    add_events(storage, "stray-x", [OLD])
    with pytest.raises(ValueError, match="orphan_scan"):
        prune_runs(storage, KEEP, now_ms=NOW, orphan_scan=-1)
    report = prune_runs(storage, KEEP, now_ms=NOW, orphan_scan=None)
    assert (report.streams, report.events) == (1, 2)
    report = prune_runs(storage, KEEP, now_ms=NOW, orphan_scan=0)
    assert (report.streams, report.events) == (0, 0)


def test_prune_with_the_clock(storage: Any) -> None:
    """Without now_ms the real clock decides: a run that finished a minute ago survives 1h, not 0s."""
    now = int(time.time() * 1000)
    add_runs(storage, [{"run_id": "recent", "status": "completed", "finished_at": now - 60_000}])
    assert prune_runs(storage, timedelta(hours=1)).runs == 0
    assert prune_runs(storage, timedelta(0)).runs == 1
    assert run_ids(storage) == set()


def test_prune_through_storage_runs(storage: Any) -> None:
    """storage.runs.prune is the same job (it delegates to prune_runs)."""
    build_scenario(storage)
    before = snapshot(storage)
    dry = storage.runs.prune(KEEP, dry_run=True, now_ms=NOW)
    assert isinstance(dry, PruneReport) and snapshot(storage) == before
    report = storage.runs.prune(KEEP, batch_size=2, now_ms=NOW)
    assert (report.runs, report.streams, report.events) == (dry.runs, dry.streams, dry.events) == (
        EXPECTED["runs"], EXPECTED["streams"], EXPECTED["events"])
    assert keys(snapshot(storage)) == expected_remaining(before, PRUNED_RUNS)


def test_stats(storage: Any) -> None:
    build_scenario(storage)
    numbers = stats(storage)
    assert numbers["tables"] == {"threads": 1, "messages": 3, "agent_runs": 9, "streams": 10,
                                 "stream_events": 8 * 3 + 2 + 2 + 2 + 1 + 2}
    assert numbers["runs"] == {"aborted": 1, "completed": 5, "failed": 1, "interrupted": 1, "running": 1}
    assert numbers["oldestRun"] == OLD - 30 * DAY - HOUR
    assert numbers["newestRun"] == NEW - HOUR


# -- reap_stale ---------------------------------------------------------------------------------

def test_reap_stale_fails_silent_running_runs_and_closes_their_streams(storage: Any) -> None:
    add_runs(storage, [
        {"run_id": "stale", "status": "running", "started_at": NOW - 5 * HOUR, "updated_at": NOW - 3 * HOUR},
        {"run_id": "stale-no-stream", "status": "running", "started_at": NOW - 5 * HOUR,
         "updated_at": NOW - 3 * HOUR, "stream": False},
        {"run_id": "alive", "status": "running", "started_at": NOW - 5 * HOUR, "updated_at": NOW - 60_000},
        {"run_id": "done", "status": "completed", "finished_at": NOW - 4 * HOUR},
    ])
    # A stale run whose stream is already closed keeps its closedAt.
    add_runs(storage, [{"run_id": "stale-closed", "status": "running", "started_at": NOW - 5 * HOUR,
                        "updated_at": NOW - 3 * HOUR, "stream": False}])
    add_stream(storage, "stale-closed", NOW - 5 * HOUR, [])
    # An open stream of a finished run is not ours to close.
    storage.models.stream.update(status="open", closed_at=None).where(
        storage.models.stream.run_id == "done").execute()
    before = snapshot(storage)

    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW) == 3
    after = snapshot(storage)
    for run_id in ("stale", "stale-no-stream", "stale-closed"):
        run = after["runs"][run_id]
        assert run["status"] == "failed"
        assert run["finishedAt"] == NOW and run["updatedAt"] == NOW
        assert run["startedAt"] == before["runs"][run_id]["startedAt"]
        event = run["finalEvent"]
        assert event["type"] == "RUN_ERROR" and event["code"] == STALE_RUN_CODE
        assert "2h" in event["message"]
    assert after["streams"]["stale"]["status"] == "closed"
    assert after["streams"]["stale"]["closedAt"] == NOW and after["streams"]["stale"]["updatedAt"] == NOW
    assert after["streams"]["stale-closed"] == before["streams"]["stale-closed"]
    for untouched in ("alive", "done"):
        assert after["runs"][untouched] == before["runs"][untouched]
        assert after["streams"][untouched] == before["streams"][untouched]
    # The open stream of a reaped run ends with the run's RUN_ERROR, so its followers read why.
    added = {k: v for k, v in after["streamEvents"].items() if k not in before["streamEvents"]}
    assert added == {"stale:4": {"id": "stale:4", "runId": "stale", "seq": 4, "timestamp": NOW,
                                 "event": after["runs"]["stale"]["finalEvent"]}}
    assert after["runs"]["stale"]["finalEvent"]["timestamp"] == NOW
    assert {k: v for k, v in after["streamEvents"].items() if k not in added} == before["streamEvents"]
    assert [e["type"] for e in storage.streams.resume("stale", 3, timeout=5)] == ["RUN_ERROR"]
    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW) == 0


def test_reap_stale_dry_run_counts_and_writes_nothing(storage: Any) -> None:
    add_runs(storage, [
        {"run_id": "stale", "status": "running", "started_at": NOW - 5 * HOUR, "updated_at": NOW - 3 * HOUR},
        {"run_id": "stale-2", "status": "running", "started_at": NOW - 5 * HOUR, "updated_at": NOW - 3 * HOUR,
         "stream": False},
        {"run_id": "alive", "status": "running", "started_at": NOW - 5 * HOUR, "updated_at": NOW - 60_000},
    ])
    before = snapshot(storage)
    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW, dry_run=True) == 2
    assert storage.runs.reap_stale(timedelta(hours=2), dry_run=True) == 3  # the clock: all three are old
    assert snapshot(storage) == before
    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW) == 2


class ClosedByHand(Streams):
    """The storage's streams, except that the stream of `run_id` is closed (by hand, for real)
    just before the reaper appends to it: a close that came between the reaper's SELECT and its append."""

    def __init__(self, storage: Any, run_id: str) -> None:
        super().__init__(Tables(storage.executor, storage.models))
        self.raced = run_id

    def append(self, run_id: str, event: Mapping[str, Any]) -> int:
        if run_id == self.raced:
            self.close(run_id)
        return super().append(run_id, event)


def test_reap_stale_skips_a_stream_closed_after_its_select(storage: Any) -> None:
    add_runs(storage, [{"run_id": run_id, "status": "running", "started_at": NOW - 5 * HOUR,
                        "updated_at": NOW - 3 * HOUR} for run_id in ("a", "raced", "z")])
    before = snapshot(storage)
    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW, streams=ClosedByHand(storage, "raced")) == 3
    after = snapshot(storage)
    assert {r["status"] for r in after["runs"].values()} == {"failed"}
    assert {s["status"] for s in after["streams"].values()} == {"closed"}
    added = {k for k in after["streamEvents"] if k not in before["streamEvents"]}
    assert added == {"a:4", "z:4"}  # the raced stream stays as its closer left it, without the RUN_ERROR
    assert after["streams"]["raced"]["closedAt"] != NOW and after["streams"]["a"]["closedAt"] == NOW


class Counting(Streams):
    """Real streams that count the events appended through them."""

    def __init__(self, storage: Any) -> None:
        super().__init__(Tables(storage.executor, storage.models))
        self.appended: List[str] = []

    def append(self, run_id: str, event: Mapping[str, Any]) -> int:
        self.appended.append(run_id)
        return super().append(run_id, event)


def test_reap_stale_appends_through_the_storages_own_streams(storage: Any) -> None:
    """One `Streams` per storage: the reaper's RUN_ERROR goes through `storage.streams` (whose
    appenders take turns on its locks), not through a second `Streams` of its own."""
    add_runs(storage, [{"run_id": run_id, "status": "running", "started_at": NOW - 5 * HOUR,
                        "updated_at": NOW - 3 * HOUR} for run_id in ("a", "b")])
    storage.streams = Counting(storage)
    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW) == 2
    assert sorted(storage.streams.appended) == ["a", "b"]
    add_runs(storage, [{"run_id": "c", "status": "running", "started_at": NOW - 5 * HOUR,
                        "updated_at": NOW - 3 * HOUR}])
    with pytest.raises(TypeError, match="streams"):
        reap_stale(Tables(storage.executor, storage.models), timedelta(hours=2), now_ms=NOW)
    assert snapshot(storage)["runs"]["c"]["status"] == "running"  # nothing written


def test_reap_stale_in_batches_then_prune(storage: Any) -> None:
    add_runs(storage, [{"run_id": f"dead-{i:03d}", "status": "running", "started_at": OLD - DAY,
                        "updated_at": OLD - DAY} for i in range(23)])
    assert reap_stale(storage, timedelta(hours=2), now_ms=NOW, batch_size=5) == 23
    after = snapshot(storage)
    assert {s["status"] for s in after["streams"].values()} == {"closed"}
    last = {e["runId"]: e for e in sorted(after["streamEvents"].values(), key=lambda e: e["seq"])}
    assert {e["event"]["code"] for e in last.values()} == {STALE_RUN_CODE} and len(last) == 23
    # Reaped runs finished "now": a 7-day prune keeps them, a zero-age prune takes them.
    assert prune_runs(storage, KEEP, now_ms=NOW).runs == 0
    assert prune_runs(storage, timedelta(0), now_ms=NOW + 1).runs == 23


# -- a prune killed part-way ---------------------------------------------------------------------

KILL_RUNS = int(os.environ.get("BAP_TEST_KILL_RUNS", "20000"))

PRUNE_SCRIPT = textwrap.dedent("""
    import sys
    from datetime import timedelta
    from better_agent_peewee import peewee_storage
    from better_agent_peewee.cli import open_database
    from better_agent_peewee.prune import prune_runs

    storage = peewee_storage(open_database(sys.argv[1]))
    def progress(report):
        print(report.batches, report.runs, flush=True)
    report = prune_runs(storage, timedelta(days=7), batch_size=int(sys.argv[2]), progress=progress)
    print("done", report.runs, report.streams, report.events, flush=True)
""")


def stream_integrity(storage: Any) -> Tuple[Set[str], Set[str], Dict[str, int]]:
    """(run ids, stream run ids, events per run id) straight from the tables."""
    m = storage.models
    runs = {r for (r,) in m.run.select(m.run.run_id).tuples()}
    streams = {r for (r,) in m.stream.select(m.stream.run_id).tuples()}
    import peewee
    events = dict(m.stream_event.select(m.stream_event.run_id, peewee.fn.COUNT(peewee.SQL("*")))
                  .group_by(m.stream_event.run_id).tuples())
    return runs, streams, events


@pytest.mark.slow
def test_prune_killed_part_way_leaves_whole_runs_and_a_rerun_finishes(
        storage: Any, database_url: str, dialect: str) -> None:
    now = int(time.time() * 1000)
    old = [{"run_id": f"run-{i:06d}", "status": ("completed", "failed", "aborted")[i % 3],
            "finished_at": now - 30 * DAY - i} for i in range(KILL_RUNS)]
    young = [{"run_id": f"run-{i:06d}y", "status": "completed", "finished_at": now - DAY}
             for i in range(0, KILL_RUNS, 100)]
    add_runs(storage, old + young, events_per_run=3)
    add_memory(storage)
    memory = ("memoryThreads", "memoryMessages")
    memory_before = snapshot(storage, memory)
    storage.database.close()

    proc = subprocess.Popen([sys.executable, "-c", PRUNE_SCRIPT, database_url, "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reported = 0
        assert proc.stdout is not None
        while reported < 5:
            line = proc.stdout.readline()
            assert line, f"prune exited early: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            reported += 1
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    runs, streams, events = stream_integrity(storage)
    all_ids = {r["run_id"] for r in old + young}
    assert runs <= all_ids
    assert len(all_ids) - len(runs) >= 5 * 20, "the first batches were reported as committed"
    assert len(runs) > len(young), "killed before the end: some old runs must remain"
    # Every remaining run is whole (stream + its 3 events); nothing is left of the others.
    assert streams == runs
    assert set(events) == runs and set(events.values()) == {3}

    # A second prune finishes the job.
    storage.database.close()
    done = subprocess.run([sys.executable, "-c", PRUNE_SCRIPT, database_url, "1000"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1].split()
    remaining_old = len(runs) - len(young)
    assert last == ["done", str(remaining_old), str(remaining_old), str(3 * remaining_old)]
    runs, streams, events = stream_integrity(storage)
    assert runs == streams == set(events) == {r["run_id"] for r in young}
    assert snapshot(storage, memory) == memory_before


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_dry_run_pages_by_the_stored_finish_time_not_its_milliseconds(storage: Any, dialect: str) -> None:
    """A dry run's pages continue after the last row's stored finishedAt. Rounded to our
    milliseconds, a time with finer digits (PostgreSQL keeps microseconds; another tool may have
    written them) would still lie after its own bound: the page would come again and again."""
    add_runs(storage, [{"run_id": f"r{i}", "status": "completed", "finished_at": OLD} for i in range(3)],
             events_per_run=1)
    storage.execute("UPDATE agent_runs SET finished_at = finished_at + interval '400 microseconds'")
    counts: List[int] = []

    def progress(report: PruneReport) -> None:
        counts.append(report.runs)
        assert len(counts) <= 10, f"the dry run does not end: {counts}"

    dry = prune_runs(storage, KEEP, now_ms=NOW, batch_size=2, dry_run=True, progress=progress)
    assert (dry.runs, dry.streams, dry.events) == (3, 3, 3), dry
    assert storage.get("runs", "r0") is not None  # a dry run deletes nothing
