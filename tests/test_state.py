"""A tracked run's state, kept in its thread as Better Agent's run.ts keeps it (issue 20, item 1).

Better Agent (packages/core/src/app/run.ts) writes the thread's `state` when a run creates the
thread, on every `onState` (a read-modify-write that keeps scope, title, metadata and
createdAt and bumps updatedAt) and at the end (the result's state); the next run reads it
back as its input: ``input.state ?? existingThread.state``. The TypeScript side is restated
here the way tests/test_tracking.py restates its records: the thread records run.ts writes,
and the kysely adapter's ``fromThreadRow`` reading the raw row.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import peewee
import pytest

from better_agent_peewee import ConflictError, NotFoundError, RecordError, create_tables, peewee_storage
from better_agent_peewee.records import now_ms

STATE = {"step": 2, "cart": ["tea", "milk"], "user": {"name": "Ada", "vip": True}, "note": None}


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def ts_reads_thread(storage: Any, thread_id: str) -> Optional[Dict[str, Any]]:
    """The thread as @better-agent/kysely's fromThreadRow reads its raw row (state: the JSON
    column's value, present unless NULL)."""
    row = storage.database.execute_sql("SELECT state, title, updated_at FROM threads WHERE id = "
                                       + storage.database.param, (thread_id,)).fetchone()
    if row is None:
        return None
    state = row[0]
    if isinstance(state, (str, bytes)):  # SQLite text, MySQL/MariaDB JSON: the ORM parses it
        state = json.loads(state)
    return {"title": row[1], **({"state": state} if row[0] is not None else {})}


def ts_next_input_state(storage: Any, thread_id: str, input_state: Any = None) -> Any:
    """The state Better Agent's next run on `thread_id` starts from: input.state ?? thread.state."""
    thread = ts_reads_thread(storage, thread_id) or {}
    return input_state if input_state is not None else thread.get("state")


def ts_writes_thread(storage: Any, thread_id: str, state: Any, **fields: Any) -> Dict[str, Any]:
    """The thread record run.ts writes when a run creates a thread (memory.threads.set)."""
    now = now_ms()
    record = {"id": thread_id, "agentName": "support", "state": state, "createdAt": now, "updatedAt": now,
              **fields}
    storage.set("memoryThreads", thread_id, record)
    return record


def test_the_given_state_is_written_at_the_start_and_kept(storage: Any) -> None:
    with storage.runs.track("r1", "support", thread_id="t1", state=STATE) as run:
        assert run.state == STATE
        assert storage.memory.threads.get("t1")["state"] == STATE      # written on entry
    assert storage.memory.threads.get("t1")["state"] == STATE
    assert ts_next_input_state(storage, "t1") == STATE                   # TypeScript's next run


def test_without_a_state_the_threads_own_is_the_runs_and_stays(storage: Any) -> None:
    ts_writes_thread(storage, "t1", {"from": "typescript", "n": 1}, title="Billing")
    before = storage.memory.threads.get("t1")
    with storage.runs.track("r1", "support", thread_id="t1") as run:
        assert run.state == {"from": "typescript", "n": 1}               # input.state ?? thread.state
    after = storage.memory.threads.get("t1")
    assert after["state"] == {"from": "typescript", "n": 1} and after["title"] == "Billing"
    assert after["updatedAt"] >= before["updatedAt"]
    with storage.runs.track("r2", "support", thread_id="t1", state={"n": 2}) as run:
        assert run.state == {"n": 2} and storage.memory.threads.get("t1")["state"] == {"n": 2}
    assert storage.memory.threads.get("t1")["title"] == "Billing"


def test_set_state_writes_only_state_and_updated_at_at_once(storage: Any) -> None:
    ts_writes_thread(storage, "t1", None, title="Old title", metadata={"k": 1})
    db = storage.database
    with storage.runs.track("r1", "support", thread_id="t1") as run:
        assert run.state is None
        started = storage.memory.threads.get("t1")["updatedAt"]
        # Someone renames the thread meanwhile (a UI, the TypeScript app): the state write keeps it.
        db.execute_sql("UPDATE threads SET title = 'Renamed' WHERE id = 't1'")
        run.set_state({"step": 1})
        thread = storage.memory.threads.get("t1")
        assert thread["state"] == {"step": 1} and run.state == {"step": 1}
        assert thread["title"] == "Renamed" and thread["metadata"] == {"k": 1}
        assert thread["updatedAt"] >= started
        run.set_state(STATE)
        assert ts_reads_thread(storage, "t1") == {"title": "Renamed", "state": STATE}
    assert storage.memory.threads.get("t1")["state"] == STATE


def test_finish_writes_the_state_in_the_end_transaction(storage: Any) -> None:
    with storage.runs.track("r1", "support", thread_id="t1", state={"step": 1}) as run:
        final = run.finish({"finishReason": "stop"}, state={"step": 9, "done": True})
    assert final["result"] == {"finishReason": "stop"} and storage.runs.get("r1")["status"] == "completed"
    assert storage.memory.threads.get("t1")["state"] == {"step": 9, "done": True} == run.state
    with storage.runs.track("r2", "support", thread_id="t1") as run:
        run.finish(interrupts=[{"id": "i1", "reason": "approval"}], state={"waiting": "approval"})
    assert storage.memory.threads.get("t1")["state"] == {"waiting": "approval"}
    with storage.runs.track("r3", "support", thread_id="t1") as run:
        assert run.state == {"waiting": "approval"}                      # the next run reads it back
        run.finish()                                                      # no state: it stays
    assert storage.memory.threads.get("t1")["state"] == {"waiting": "approval"}


def test_a_state_write_is_refused_once_the_run_has_ended(storage: Any) -> None:
    with storage.runs.track("r1", "support", thread_id="t1", state={"v": 1}) as run:
        pass
    with pytest.raises(ConflictError, match="has ended"):
        run.set_state({"v": 2})
    # Ended elsewhere (the reaper, another writer) while the block still runs: the UPDATE itself
    # checks that the run is running, so nothing is written.
    run2 = storage.runs.track("r2", "support", thread_id="t1")
    run2.start()
    storage.runs.finish("r2", "failed", {"type": "RUN_ERROR", "message": "reaped"})
    with pytest.raises(ConflictError, match="already ended"):
        run2.set_state({"v": 3})
    assert storage.memory.threads.get("t1")["state"] == {"v": 1}
    with pytest.raises(ConflictError):
        with run2:
            pass


def test_a_deleted_thread_is_not_found(storage: Any) -> None:
    run = storage.runs.track("r1", "support", thread_id="t1")
    run.start()
    storage.memory.threads.delete("t1")
    with pytest.raises(NotFoundError, match="'t1' was deleted"):
        run.set_state({"v": 1})
    assert storage.memory.threads.get("t1") is None


@pytest.mark.parametrize("bad", [{"when": object()}, {1, 2}, {"x": float("nan")}, "\x00", b"bytes"])
def test_a_state_that_is_not_json_is_refused_and_nothing_is_written(storage: Any, bad: Any) -> None:
    with pytest.raises(RecordError, match="memoryThreads.state"):
        storage.runs.track("r1", "support", thread_id="t1", state=bad)
    assert storage.runs.get("r1") is None and storage.memory.threads.get("t1") is None
    with storage.runs.track("r1", "support", thread_id="t1", state={"ok": 1}) as run:
        with pytest.raises(RecordError, match="memoryThreads.state"):
            run.set_state(bad)
        with pytest.raises(RecordError, match="memoryThreads.state"):
            run.finish(state=bad)
        assert storage.runs.get("r1")["status"] == "running"              # the finish wrote nothing
    assert storage.memory.threads.get("t1")["state"] == {"ok": 1}


def test_a_run_without_a_thread_keeps_its_state_on_the_run_only(storage: Any) -> None:
    # As Better Agent: the state is the runtime's; only a thread would keep it for the next run.
    with storage.runs.track("r1", "support", state={"v": 1}) as run:
        assert run.state == {"v": 1}
        run.set_state({"v": 2})
        with pytest.raises(RecordError, match="memoryThreads.state"):
            run.set_state({1, 2})
        run.finish(state={"v": 3})
    assert run.state == {"v": 3} and storage.runs.get("r1")["status"] == "completed"
    assert storage.memory.threads.list() == []
