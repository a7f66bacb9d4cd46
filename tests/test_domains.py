"""Storage domains: memory, runs and streams here, elsewhere or nowhere (Better Agent's composite storage)."""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, List

import peewee
import pytest

from better_agent_peewee import (
    DomainNotConfiguredError,
    StorageError,
    UnsupportedTableError,
    check_schema,
    create_tables,
    drop_tables,
    peewee_storage,
)
from tests.test_cli import cli, one_error_line

ALL = {"threads", "messages", "agent_runs", "streams", "stream_events"}


def tables(db: peewee.Database) -> set:
    return set(db.get_tables()) & ALL


def rows(db: peewee.Database, table: str) -> int:
    return int(db.execute_sql(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_create_check_and_drop_the_tables_of_some_domains(database: peewee.Database) -> None:
    create_tables(database, domains=["memory"])
    assert tables(database) == {"threads", "messages"}
    assert check_schema(database, domains=["memory"]) == []
    assert set(check_schema(database)) == {"missing table agent_runs", "missing table streams",
                                           "missing table stream_events"}
    create_tables(database, domains="runs,streams")     # a string: comma-separated
    assert tables(database) == ALL and check_schema(database) == []
    drop_tables(database, domains=("streams",))
    assert tables(database) == {"threads", "messages", "agent_runs"}
    assert check_schema(database, domains=("memory", "runs")) == []
    drop_tables(database)
    assert tables(database) == set()


@pytest.mark.parametrize("domains", [["memroy"], "runs,stream", [], "", [None], ["runs", 5]])
def test_an_unknown_domain_is_a_clear_error_and_nothing_is_created(database: peewee.Database,
                                                                    domains: Any) -> None:
    for call in (lambda: create_tables(database, domains=domains),
                 lambda: check_schema(database, domains=domains),
                 lambda: drop_tables(database, domains=domains),
                 lambda: peewee_storage(database, domains=domains)):
        with pytest.raises(ValueError, match="domain") as caught:
            call()
        assert "memory, runs, streams" in str(caught.value)
    assert tables(database) == set()


def test_a_call_that_needs_an_omitted_domain_raises_and_writes_nothing(database: peewee.Database) -> None:
    create_tables(database)
    storage = peewee_storage(database, domains=["memory"])
    assert storage.domains == ("memory",)
    attempts: List[Any] = [
        ("runs", lambda: storage.get("runs", "r1")),
        ("runs", lambda: storage.set("runs", "r1", {"runId": "r1"})),
        ("streams", lambda: storage.list("streamEvents", {"where": {"runId": "r1"}})),
        ("streams", lambda: storage.delete("streams", "r1")),
        ("runs", lambda: storage.runs.start("r1", "support")),
        ("runs", lambda: storage.runs.track("r1", "support")),
        ("streams", lambda: storage.streams.open("r1")),
        ("streams", lambda: storage.streams.resume("r1")),
        ("runs", lambda: storage.agent("support").abort()),
    ]
    for domain, attempt in attempts:
        with pytest.raises(DomainNotConfiguredError) as caught:
            attempt()
        error = caught.value
        assert isinstance(error, UnsupportedTableError) and isinstance(error, StorageError)
        assert error.domain == domain
        text = str(error)
        assert f"the {domain} domain is not configured" in text and f"domains=[..., '{domain}']" in text
        assert "better-agent-peewee init --domains" in text
    assert rows(database, "agent_runs") == rows(database, "streams") == 0
    with pytest.raises(UnsupportedTableError) as unknown:
        storage.get("users", "u1")
    assert not isinstance(unknown.value, DomainNotConfiguredError)
    # What is configured works as ever.
    storage.memory.threads.set("t1", {"id": "t1", "agentName": "support", "createdAt": 1, "updatedAt": 1})
    assert storage.get("memoryThreads", "t1")["agentName"] == "support"


def test_a_storage_over_memory_alone_needs_only_its_tables(database: peewee.Database) -> None:
    create_tables(database, domains=["memory"])
    storage = peewee_storage(database, domains=["memory"])
    storage.memory.threads.set("t1", {"id": "t1", "agentName": "support", "createdAt": 1, "updatedAt": 1})
    storage.memory.messages.append("t1", [{"role": "user", "content": "hi"}])
    assert [m["content"] for m in storage.memory.messages.list("t1")] == ["hi"]
    assert storage.memory.fork("t2", "t1")["id"] == "t2"
    storage.memory.threads.delete("t2")
    assert [t["id"] for t in storage.memory.threads.list()] == ["t1"]


def test_the_command_line_takes_domains(database: peewee.Database, database_url: str) -> None:
    result = cli("init", "--domains", "memory,runs", url=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("created threads, messages, agent_runs\n")
    assert tables(database) == {"threads", "messages", "agent_runs"}
    database.close()
    ok = cli("check", "--domains", "memory,runs", url=database_url)
    assert ok.returncode == 0 and "schema ok" in ok.stdout, ok.stdout + ok.stderr
    missing = cli("check", url=database_url)
    assert missing.returncode == 1 and "missing table streams" in missing.stdout
    numbers = cli("stats", "--json", "--domains", "memory", url=database_url)
    assert numbers.returncode == 0, numbers.stderr
    assert json.loads(numbers.stdout) == {"tables": {"threads": 0, "messages": 0}, "runs": {},
                                          "oldestRun": None, "newestRun": None}
    one_error_line(cli("stats", url=database_url), 1, "missing table", "streams")
    for command in ("init", "check", "stats"):
        one_error_line(cli(command, "--domains", "memory,logs", url=database_url), 2, "'logs'",
                       "memory, runs, streams")
    assert tables(database) == {"threads", "messages", "agent_runs"}


def test_track_records_the_run_without_the_streams_domain(database: peewee.Database) -> None:
    create_tables(database, domains=["memory", "runs"])
    storage = peewee_storage(database, domains=["memory", "runs"])
    with storage.runs.track("r1", "support", thread_id="t1", state={"v": 1},
                            messages=[{"role": "user", "content": "hi"}]) as run:
        assert run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x"}) == 0  # not stored
        run.check_abort()
        run.set_state({"v": 2})
        run.append_messages([{"role": "assistant", "content": "hello"}])
    record = storage.runs.get("r1")
    assert record["status"] == "completed" and record["finalEvent"]["type"] == "RUN_FINISHED"
    assert storage.memory.threads.get("t1")["state"] == {"v": 2}
    assert [m["content"] for m in storage.memory.messages.list("t1")] == ["hi", "hello"]
    assert storage.agent("support").running() is None
    with storage.runs.track("r1", "support", thread_id="t1") as again:   # an ended id started over
        assert storage.runs.get("r1")["status"] == "running"
    assert again.status == "completed" and storage.runs.get("r1")["status"] == "completed"


def test_track_records_the_run_without_the_memory_domain(database: peewee.Database) -> None:
    create_tables(database, domains=["runs", "streams"])
    storage = peewee_storage(database, domains=["runs", "streams"])
    with storage.runs.track("r1", "support", thread_id="t1", state={"v": 1},
                            messages=[{"role": "user", "content": "hi"}]) as run:
        assert run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x"}) == 2
        kept = run.append_messages([{"role": "assistant", "content": "hello"}])   # no memory: on the run only
        assert [m["content"] for m in kept] == ["hello"] and run.messages == kept
        run.set_state({"v": 2})
        assert run.state == {"v": 2}
    assert storage.runs.get("r1")["threadId"] == "t1" and storage.runs.get("r1")["status"] == "completed"
    assert [e["type"] for e in storage.streams.resume("r1", timeout=5)] == [
        "RUN_STARTED", "TEXT_MESSAGE_CONTENT", "RUN_FINISHED"]
    assert "threads" not in set(database.get_tables())


def test_prune_skips_what_is_not_there(database: peewee.Database, database_url: str) -> None:
    create_tables(database, domains=["memory"])
    storage = peewee_storage(database, domains=["memory"])
    storage.memory.threads.set("old", {"id": "old", "agentName": "support", "createdAt": 0, "updatedAt": 0})
    storage.memory.messages.append("old", [{"role": "user", "content": "hi"}])
    storage.memory.threads.set("idle-2", {"id": "idle-2", "agentName": "support", "createdAt": 0,
                                          "updatedAt": 0})
    dry = storage.memory.prune_threads(timedelta(days=1), dry_run=True)     # no agent_runs table to ask
    assert (dry.threads, dry.messages) == (2, 1)
    database.close()
    result = cli("prune", "--threads-idle-for", "1d", "--agent", "support", url=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pruned 2 threads, 1 messages idle since ")
    one_error_line(cli("prune", "--older-than", "7d", url=database_url), 1, "missing table", "agent_runs")


def test_prune_and_reap_without_the_streams_domain(database: peewee.Database, database_url: str) -> None:
    from tests.test_prune import DAY

    create_tables(database, domains=["memory", "runs"])
    storage = peewee_storage(database, domains=["memory", "runs"])
    now = 1_700_000_000_000
    for run_id, status, finished in (("old", "completed", now - 10 * DAY), ("new", "completed", now - DAY)):
        storage.set("runs", run_id, {"runId": run_id, "agentName": "a", "status": status, "config": None,
                                     "startedAt": finished - 1000, "updatedAt": finished,
                                     "finishedAt": finished})
    storage.set("runs", "dead", {"runId": "dead", "agentName": "a", "status": "running", "config": None,
                                 "startedAt": now - DAY, "updatedAt": now - DAY})
    dry = storage.runs.prune(timedelta(days=7), now_ms=now, dry_run=True)
    assert (dry.runs, dry.streams, dry.events) == (1, 0, 0)
    report = storage.runs.prune(timedelta(days=7), now_ms=now, orphan_scan=None)
    assert (report.runs, report.streams, report.events) == (1, 0, 0)
    assert storage.runs.get("old") is None and storage.runs.get("new") is not None
    assert storage.runs.reap_stale(timedelta(hours=1)) == 1
    assert storage.runs.get("dead")["status"] == "failed"
    assert storage.runs.get("dead")["finalEvent"]["code"] == "STALE_RUN"
    database.close()
    result = cli("prune", "--older-than", "7d", "--reap-stale", "1h", "--threads-idle-for", "30d",
                 url=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reaped 0 stale runs; pruned 1 runs, 0 streams, 0 events older than ")
    assert storage.runs.get("new") is None
