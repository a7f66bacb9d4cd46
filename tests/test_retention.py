"""storage.memory.prune_threads: memory retention (threads idle for a while, with their messages)."""
from __future__ import annotations

import datetime as dt
import os
import pty
import subprocess
import sys
import time
from typing import Any, List

import peewee
import pytest

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.retention import ThreadPruneReport

NOW = 1_700_000_000_000
DAY = 86_400_000
IDLE = dt.timedelta(days=30)


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def thread(storage: Any, thread_id: str, updated: int, agent: str = "support", messages: int = 3) -> None:
    storage.memory.threads.set(thread_id, {"id": thread_id, "agentName": agent, "title": thread_id,
                                           "createdAt": updated, "updatedAt": updated})
    for i in range(messages):
        storage.set("memoryMessages", f"{thread_id}:{updated + i}:m{i}",
                    {"id": f"m{i}", "role": "user", "content": "hi", "threadId": thread_id,
                     "createdAt": updated + i})


def run(storage: Any, run_id: str, thread_id: str, status: str = "running") -> None:
    record = {"runId": run_id, "agentName": "support", "threadId": thread_id, "status": status,
              "config": None, "startedAt": NOW - 40 * DAY, "updatedAt": NOW - 40 * DAY}
    if status != "running":
        record["finishedAt"] = NOW - 40 * DAY
    storage.set("runs", run_id, record)


def left(storage: Any) -> List[str]:
    return sorted(t["id"] for t in storage.memory.threads.list())


def message_count(storage: Any) -> int:
    return int(storage.database.execute_sql("SELECT COUNT(*) FROM messages").fetchone()[0])


def test_idle_threads_go_with_their_messages_and_the_rest_stays(storage: Any) -> None:
    thread(storage, "old-1", NOW - 40 * DAY)
    thread(storage, "old-2", NOW - 31 * DAY, messages=5)
    thread(storage, "recent", NOW - 29 * DAY)
    thread(storage, "today", NOW)
    report = storage.memory.prune_threads(IDLE, now_ms=NOW)
    assert isinstance(report, ThreadPruneReport)
    assert (report.threads, report.messages, report.dry_run) == (2, 8, False)
    assert report.cutoff_ms == NOW - 30 * DAY and report.batches == 1
    assert "pruned 2 threads, 8 messages idle since" in report.summary()
    assert left(storage) == ["recent", "today"]
    assert message_count(storage) == 6
    assert storage.memory.messages.list("old-1") == []
    again = storage.memory.prune_threads(IDLE, now_ms=NOW)
    assert (again.threads, again.messages) == (0, 0)


def test_a_dry_run_counts_and_deletes_nothing(storage: Any) -> None:
    for i in range(5):
        thread(storage, f"old-{i}", NOW - 40 * DAY + i)
    report = storage.memory.prune_threads(IDLE, now_ms=NOW, dry_run=True, batch_size=2)
    assert (report.threads, report.messages, report.batches, report.dry_run) == (5, 15, 3, True)
    assert report.summary().startswith("would prune 5 threads, 15 messages")
    assert report.summary().endswith("[dry run]")
    assert len(left(storage)) == 5 and message_count(storage) == 15


def test_only_the_given_agents_threads(storage: Any) -> None:
    thread(storage, "a", NOW - 40 * DAY, agent="support")
    thread(storage, "b", NOW - 40 * DAY, agent="sales")
    report = storage.memory.prune_threads(IDLE, agent_name="sales", now_ms=NOW)
    assert (report.threads, report.messages) == (1, 3)
    assert left(storage) == ["a"]


def test_a_thread_with_a_running_run_is_never_deleted_and_the_pages_go_past_it(storage: Any) -> None:
    # The two oldest threads have running runs: with batch_size 2 the first page holds only
    # them; the prune must go on past them, not stop (or loop) on a page it deletes nothing of.
    for i in range(6):
        thread(storage, f"t{i}", NOW - 40 * DAY + i)
    run(storage, "r0", "t0")
    run(storage, "r1", "t1")
    run(storage, "r2", "t2", status="completed")      # a finished run does not keep its thread
    report = storage.memory.prune_threads(IDLE, now_ms=NOW, batch_size=2)
    assert (report.threads, report.messages) == (4, 12)
    assert left(storage) == ["t0", "t1"]
    assert storage.runs.get("r2")["status"] == "completed"   # runs are prune_runs' to delete
    dry = storage.memory.prune_threads(IDLE, now_ms=NOW, dry_run=True)
    assert (dry.threads, dry.messages) == (0, 0)


def test_each_batch_is_one_transaction_and_a_rerun_finishes(storage: Any, dialect: str) -> None:
    """A batch that fails half-way (here a table of the user's still references one of its
    threads) leaves its threads whole: messages included. The batches before stay done."""
    for i in range(4):
        thread(storage, f"t{i}", NOW - 40 * DAY + i)
    db = storage.database
    collate = " COLLATE utf8mb4_bin" if dialect == "mysql" else ""
    db.execute_sql(f"CREATE TABLE pins (thread_id VARCHAR(255){collate} NOT NULL, "
                   "FOREIGN KEY (thread_id) REFERENCES threads (id))")
    try:
        db.execute_sql("INSERT INTO pins (thread_id) VALUES ('t3')")
        with pytest.raises(peewee.IntegrityError):
            storage.memory.prune_threads(IDLE, now_ms=NOW, batch_size=2)
        assert left(storage) == ["t2", "t3"]
        assert [len(storage.memory.messages.list(t)) for t in ("t2", "t3")] == [3, 3]
        db.execute_sql("DELETE FROM pins")
        report = storage.memory.prune_threads(IDLE, now_ms=NOW, batch_size=2)
        assert (report.threads, report.messages) == (2, 6)
        assert left(storage) == [] and message_count(storage) == 0
    finally:
        db.execute_sql("DROP TABLE pins")


def test_a_thread_touched_by_a_starting_run_is_not_idle(storage: Any) -> None:
    thread(storage, "t1", NOW - 40 * DAY)
    with storage.runs.track("r1", "support", thread_id="t1"):
        pass
    report = storage.memory.prune_threads(IDLE)  # the clock: t1 was updated just now
    assert report.threads == 0 and left(storage) == ["t1"]


@pytest.mark.parametrize("idle_for, error", [
    (dt.timedelta(0), ValueError), (dt.timedelta(seconds=-1), ValueError), (30, TypeError),
    ("30d", TypeError), (None, TypeError)])
def test_bad_durations_are_refused_and_nothing_is_deleted(storage: Any, idle_for: Any, error: type) -> None:
    thread(storage, "old", NOW - 40 * DAY)
    with pytest.raises(error, match="idle_for"):
        storage.memory.prune_threads(idle_for, now_ms=NOW)
    assert left(storage) == ["old"]


@pytest.mark.parametrize("options", [{"batch_size": 0}, {"batch_size": True}, {"agent_name": ""},
                                     {"agent_name": 5}])
def test_bad_options_are_refused(storage: Any, options: Any) -> None:
    thread(storage, "old", NOW - 40 * DAY)
    with pytest.raises(ValueError):
        storage.memory.prune_threads(IDLE, now_ms=NOW, **options)
    assert left(storage) == ["old"]


# -- the command line: prune --threads-idle-for ----------------------------------------------------

def test_cli_prunes_idle_threads_alone_or_with_runs(storage: Any, database_url: str) -> None:
    from tests.test_cli import cli, one_error_line
    from tests.test_prune import add_runs

    now = int(time.time() * 1000)
    thread(storage, "old", now - 40 * DAY)
    thread(storage, "old-sales", now - 40 * DAY, agent="sales")
    thread(storage, "new", now - DAY)
    add_runs(storage, [{"run_id": "old-run", "status": "completed", "finished_at": now - 10 * DAY}],
             events_per_run=2)
    storage.database.close()
    dry = cli("prune", "--threads-idle-for", "30d", "--older-than", "7d", "--dry-run", url=database_url)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would prune 1 runs, 1 streams, 2 events older than ")
    assert "; would prune 2 threads, 6 messages idle since " in dry.stdout
    assert dry.stdout.endswith(" [dry run]\n") and dry.stdout.count("[dry run]") == 1
    assert len(left(storage)) == 3 and storage.runs.get("old-run") is not None
    storage.database.close()

    sales = cli("prune", "--threads-idle-for", "30d", "--agent", "sales", url=database_url)
    assert sales.returncode == 0 and sales.stdout.startswith("pruned 1 threads, 3 messages idle since ")
    assert storage.runs.get("old-run") is not None          # alone: no run is pruned
    assert left(storage) == ["new", "old"]
    storage.database.close()
    both = cli("prune", "--older-than", "7d", "--threads-idle-for", "30d", url=database_url)
    assert both.returncode == 0, both.stderr
    assert both.stdout.startswith("pruned 1 runs, 1 streams, 2 events older than ")
    assert "; pruned 1 threads, 3 messages idle since " in both.stdout
    assert left(storage) == ["new"] and storage.runs.get("old-run") is None
    storage.database.close()

    one_error_line(cli("prune", "--agent", "sales", url=database_url), 2, "--threads-idle-for")
    one_error_line(cli("prune", "--threads-idle-for", "0s", url=database_url), 2, "positive duration")
    one_error_line(cli("prune", "--threads-idle-for", "soon", url=database_url), 2, "'soon'")
    one_error_line(cli("prune", url=database_url), 2, "--threads-idle-for")
    assert left(storage) == ["new"]


def test_cli_thread_prune_progress_on_a_terminal(storage: Any, database_url: str) -> None:
    from tests.test_cli import TIMEOUT, read_all

    now = int(time.time() * 1000)
    for i in range(2):
        thread(storage, f"old-{i}", now - 40 * DAY + i)
    storage.database.close()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "better_agent_peewee", "prune",
                             "--threads-idle-for", "30d", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=slave,
                            env=dict(os.environ, DATABASE_URL=database_url), text=True)
    os.close(slave)
    out, _ = proc.communicate(timeout=TIMEOUT)
    progress = read_all(master)
    assert proc.returncode == 0
    assert out.startswith("pruned 2 threads, 6 messages") and out.count("\n") == 1
    assert "\rbatch 1: 1 threads, 3 messages" in progress and "\rbatch 2: 2 threads, 6 messages" in progress
