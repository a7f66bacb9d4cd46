"""A dead worker is noticed without cron: followers of a run whose heartbeat stopped end "stale",
on SQLite, PostgreSQL and MariaDB, with a real worker process killed by SIGKILL.

Nothing here asserts a duration: bench/stale.py measures the time from the kill to the end.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import timedelta
from typing import Any, Dict, List

import peewee
import pytest

from bench.stale import first_beat
from bench.stale import start_worker as bench_worker
from better_agent_peewee import (
    RunAborted,
    RunEndedElsewhere,
    create_tables,
    peewee_storage,
    reap_stale,
)
from better_agent_peewee.liveness import FIRST_LIVENESS
from better_agent_peewee.sse import event_stream
from tests.test_followers import Reader
from tests.test_prune import snapshot


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def start_worker(url: str, run_id: str, beat: float = 0.2) -> subprocess.Popen:  # type: ignore[type-arg]
    """bench.stale's worker process (the one W16 kills), gone by itself after 5 minutes."""
    return bench_worker(url, run_id, beat, linger=300)


def dead_run(storage: Any, run_id: str, agent: str, events: List[Dict[str, Any]]) -> None:
    """A running run with an open stream of `events` whose worker beat last two minutes ago (over
    the default stale limit): what a follower finds after its worker was killed."""
    storage.runs.start(run_id, agent)
    storage.streams.open(run_id)
    storage.streams.append_many(run_id, events)
    Run = storage.models.run
    beat = int(time.time() * 1000) - 120_000
    Run.update(started_at=beat - 1, updated_at=beat).where(Run.run_id == run_id).execute()


def beaten(storage: Any, run_id: str) -> None:
    """Wait until `run_id` has heartbeat once (a run killed before its first beat is never judged)."""
    # (FIRST_BEAT_LATEST when quiet; a loaded machine takes longer)
    assert first_beat(storage, run_id, 60), f"{run_id} never sent its first heartbeat"


def test_the_follower_of_a_killed_worker_ends_stale(storage: Any, database_url: str) -> None:
    worker = start_worker(database_url, "doomed")
    try:
        # stale_after: four times the real beat interval (heartbeats.MIN_PAUSE, 0.5 s), as the
        # defaults' 40 s are of 10 s: a loaded machine's late beats do not make a live worker stale.
        reader = Reader(storage, "doomed", stale_after=2.0)
        beaten(storage, "doomed")
        time.sleep(3.0)  # alive past stale_after + a check: the heartbeat thread keeps it so
        assert reader.is_alive() and reader.reason is None
    finally:
        worker.kill()
        worker.wait(30)
    reader.finished()
    assert reader.reason == "stale"
    assert [e["type"] for e in reader.items] == ["RUN_STARTED"] + ["TEXT_MESSAGE_CONTENT"] * 3
    # The follower only reports: the run and its stream stay as the dead worker left them.
    assert storage.runs.get("doomed")["status"] == "running"
    assert storage.streams.get("doomed")["status"] == "open"
    # A new follower learns it at once, from the start or from where the last one stopped.
    follower = storage.streams.resume("doomed", 2, stale_after=1.0, timeout=60)
    assert [e["seq"] for e in follower] == [3, 4] and follower.reason == "stale"
    follower = storage.streams.resume("doomed", 4, stale_after=1.0, timeout=60)
    assert list(follower) == [] and follower.reason == "stale"
    # stale_after=None: this follower waits (here, until its timeout).
    follower = storage.streams.resume("doomed", 4, stale_after=None, timeout=2)
    assert list(follower) == [] and follower.reason == "timeout"


def test_a_silent_live_run_is_not_stale(storage: Any) -> None:
    with storage.runs.track("slow", "agent", heartbeat_interval=0.2) as run:
        reader = Reader(storage, "slow", stale_after=2.0)  # (four beat intervals: see above)
        time.sleep(3.5)  # one long step, past a first beat + stale_after + a check: the thread beats
        assert reader.is_alive() and reader.reason is None
        run.emit({"type": "CUSTOM", "name": "done", "value": 1})
    assert reader.finished().reason == "closed"
    assert [e["type"] for e in reader.items] == ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]
    assert "slow" not in storage.runs.heartbeats  # the block is over: no more beats


def test_a_run_that_never_beats_is_never_called_stale(storage: Any) -> None:
    # Better Agent's own runtime writes updatedAt = startedAt and never beats: an old running run
    # of such a writer is not judged (only runs that have beaten once are).
    storage.runs.start("ts-run", "agent")
    storage.streams.open("ts-run")
    Run = storage.models.run
    long_ago = int(time.time() * 1000) - 3_600_000
    Run.update(started_at=long_ago, updated_at=long_ago).where(Run.run_id == "ts-run").execute()
    follower = storage.streams.resume("ts-run", stale_after=0.5, timeout=2)
    assert list(follower) == [] and follower.reason == "timeout"
    # Once it has beaten, and then not for stale_after, it is.
    Run.update(updated_at=long_ago + 1).where(Run.run_id == "ts-run").execute()
    follower = storage.streams.resume("ts-run", stale_after=0.5, timeout=60)
    assert list(follower) == [] and follower.reason == "stale"


def test_a_follower_does_not_end_stale_before_it_has_every_event(storage: Any) -> None:
    storage.runs.start("dead", "agent")
    storage.streams.open("dead")
    storage.streams.append_many("dead", [{"type": "X", "i": i} for i in range(1200)])  # > one window
    Run = storage.models.run
    long_ago = int(time.time() * 1000) - 3_600_000
    Run.update(started_at=long_ago, updated_at=long_ago + 1).where(Run.run_id == "dead").execute()
    follower = storage.streams.resume("dead", stale_after=0.5, timeout=60)
    assert [e["i"] for e in follower] == list(range(1200)) and follower.reason == "stale"


def test_stale_after_must_be_a_positive_number(storage: Any) -> None:
    storage.streams.open("r")
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="stale_after"):
            storage.streams.resume("r", stale_after=bad)


def test_an_after_seq_beyond_the_end_is_not_reported_as_the_last_seq(storage: Any) -> None:
    storage.streams.open("short")
    storage.streams.append_many("short", [{"type": "X"}] * 3)
    storage.streams.close("short")
    follower = storage.streams.resume("short", 999, timeout=60)
    assert list(follower) == [] and (follower.reason, follower.last_seq) == ("closed", 3)
    body = "".join(event_stream(storage, "short", 999, end_event=True))
    assert body == 'event: end\ndata: {"runId":"short","lastSeq":3,"reason":"closed"}\n\n'


def test_many_followers_one_liveness_statement(storage: Any) -> None:
    # Liveness is read for all followed runs together, not per follower.
    for i in range(30):
        storage.runs.start(f"r{i}", "agent")
        storage.streams.open(f"r{i}")
    stop = threading.Event()
    started = time.monotonic()
    readers = [Reader(storage, f"r{i}", stale_after=60.0, stop=stop) for i in range(30)]
    poller = storage.streams.poller()
    time.sleep(2.0)
    checks, seconds = poller.liveness_checks, time.monotonic() - started
    stop.set()
    for reader in readers:
        assert reader.finished().reason == "stopped"
    # About one a second while followers keep arriving (4 in all when quiet; more while a loaded
    # machine lets them arrive slowly), then one per LIVENESS_PAUSE: not thirty in any round.
    assert 1 <= checks <= min(29, 2 + int(seconds / FIRST_LIVENESS)), (checks, seconds)


# -- a reaped worker stops ------------------------------------------------------------------------

def test_a_reaped_worker_is_told_by_check_abort_and_writes_nothing_more(storage: Any) -> None:
    with storage.runs.track("reaped", "agent", abort_check_interval=0.05) as run:
        run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "a"})
        run.check_abort()  # running: passes
        time.sleep(0.1)  # (after the heartbeat thread's first beat, 10 ms after the start)
        assert reap_stale(storage, timedelta(0)) == 1  # (the worker lives, but the reaper says dead)
        before = snapshot(storage)
        deadline = time.monotonic() + 5
        with pytest.raises(RunEndedElsewhere) as caught:
            while time.monotonic() < deadline:
                run.check_abort()  # a worker's per-token loop
                time.sleep(0.005)
        assert isinstance(caught.value, RunAborted)
        assert caught.value.status == "failed" and caught.value.final_event["code"] == "STALE_RUN"
        with pytest.raises(RunEndedElsewhere):
            run.check_abort()  # once seen, every call raises
        with pytest.raises(RunEndedElsewhere):
            run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "b"})
        raise caught.value  # the worker lets it propagate: the block ends quietly
    assert snapshot(storage) == before  # nothing more written: the reaper's outcome stays
    assert storage.runs.get("reaped")["status"] == "failed"
    assert "reaped" not in storage.runs.heartbeats


def test_an_emit_after_another_writer_ended_the_run_says_so(storage: Any) -> None:
    with storage.runs.track("taken", "agent") as run:
        assert storage.runs.finish("taken", "aborted", {"type": "RUN_ERROR", "message": "by hand",
                                                         "code": "ABORTED"})
        storage.streams.close("taken")
        before = snapshot(storage)
        with pytest.raises(RunEndedElsewhere, match="by hand") as caught:
            run.emit({"type": "CUSTOM", "name": "x", "value": 1})
        assert caught.value.status == "aborted"
    assert snapshot(storage) == before


def test_the_sse_body_of_a_dead_run_ends_with_an_error_frame(storage: Any) -> None:
    dead_run(storage, "dead-sse", "agent", [{"type": "RUN_STARTED"}, {"type": "TEXT_MESSAGE_START"}])
    body = "".join(event_stream(storage, "dead-sse", 0, max_seconds=60))
    body += "".join(event_stream(storage, "dead-sse", 2, max_seconds=60, end_event=True))
    frames = body.split("\n\n")[:-1]
    assert [f.split("\n")[0] for f in frames] == ["id: 1", "id: 2", "event: error", "event: error"]
    problem = json.loads(frames[-1].split("data: ", 1)[1])
    assert set(problem) >= {"type", "title", "status", "detail", "code"}
    assert problem["code"] == "STALE_RUN" and problem["status"] == 503
    assert problem["context"] == {"runId": "dead-sse", "lastSeq": 2}
    assert frames[-1] == frames[2]  # with end_event too: the error, never an end
    assert "event: end" not in body


def test_the_heartbeats_of_a_process_share_rounds(storage: Any) -> None:
    # Runs started 0.1 s apart, beating every second: about one UPDATE a second for all of them,
    # not one per run per second (which would be 60 in these 3 s).
    runs = []
    for i in range(20):
        runs.append(storage.runs.track(f"beat-{i}", "agent", heartbeat_interval=1.0).start())
        time.sleep(0.1)
    beats = storage.runs.heartbeats
    before = beats.statements
    time.sleep(3.0)
    sent = beats.statements - before
    assert 1 <= sent <= 12, sent
    Run = storage.models.run
    fresh = int(time.time() * 1000) - 2500
    assert Run.select().where(Run.updated_at < fresh).count() == 0  # every run beat within its interval
    for run in runs:
        run.finish()
    assert not any(f"beat-{i}" in beats for i in range(20))


def test_followers_of_a_streams_only_storage_still_follow(database: peewee.Database) -> None:
    # The runs domain kept elsewhere (no agent_runs here): no liveness check, the rest as before.
    create_tables(database, domains=["streams"])
    storage = peewee_storage(database, domains=["streams"])
    storage.streams.open("s1")
    storage.streams.append("s1", {"type": "A"})
    reader = Reader(storage, "s1", stale_after=0.2)
    time.sleep(0.5)  # several liveness checks' worth
    storage.streams.append("s1", {"type": "B"})
    storage.streams.close("s1")
    assert reader.finished().reason == "closed"
    assert [e["type"] for e in reader.items] == ["A", "B"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (on purpose)
def test_a_heartbeat_thread_that_died_is_started_again(storage: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A round that raises past its own handler ends the thread; the next run must get a new one,
    # or the process's tracked runs stop beating and are reaped while they live.
    beats = storage.runs.heartbeats
    assert not beats.inline  # (the suite's SQLite databases are files: a thread beats)
    died = threading.Event()

    def broken(run_ids: Any) -> None:
        died.set()
        raise RuntimeError("a round failed past its handler")

    monkeypatch.setattr(beats, "_beat", broken)
    beats.add("first", 0.5)
    assert died.wait(5)
    beats.remove("first")
    deadline = time.monotonic() + 5
    while beats._thread is not None and beats._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.undo()
    before = beats.statements
    with storage.runs.track("second", "agent", heartbeat_interval=0.5):
        deadline = time.monotonic() + 5
        while beats.statements == before and time.monotonic() < deadline:
            time.sleep(0.02)
    assert beats.statements > before


def test_a_missing_table_is_told_from_other_failures(storage: Any, database: peewee.Database) -> None:
    # The liveness check turns itself off only when agent_runs is not there; any other failure
    # (a timeout, a node not ready) fails one round.
    dialect = storage.executor.dialect
    with pytest.raises(peewee.DatabaseError) as missing:
        database.execute_sql("SELECT 1 FROM bap_no_such_table")
    assert dialect.is_missing_table(missing.value)
    with pytest.raises(peewee.DatabaseError) as other:
        database.execute_sql("SELECT no_such_column FROM agent_runs")
    assert not dialect.is_missing_table(other.value)


def test_first_line_of_a_blank_message() -> None:
    from better_agent_peewee.driver_errors import first_line

    assert first_line(RuntimeError("  \n ")) == "RuntimeError"
    assert first_line(RuntimeError("\nboom\nmore")) == "boom"
