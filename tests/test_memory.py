"""storage.memory: threads, messages and fork, as Better Agent's memory uses them
("Memory" in docs/contract.md)."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import peewee
import pytest

from better_agent_peewee import ConflictError, NotFoundError, RecordError, create_tables, peewee_storage
from better_agent_peewee.records import now_ms
from tests.samples import snapshot

T0 = 1_700_000_000_000


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def put_thread(storage: Any, thread_id: str, **fields: Any) -> Dict[str, Any]:
    rec = {"id": thread_id, "agentName": "agent", "createdAt": T0, "updatedAt": T0}
    rec.update(fields)
    storage.memory.threads.set(thread_id, rec)
    return rec


def msg(i: Any, role: str = "user", **extra: Any) -> Dict[str, Any]:
    return {"id": f"m{i}", "role": role, "content": f"message {i}", **extra}


def contents(records: List[Dict[str, Any]]) -> List[str]:
    return [r["content"] for r in records]


class Statements:
    """The SQL (and parameters) a database runs while the block is open."""

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self.seen: List[Any] = []

    def __enter__(self) -> Statements:
        self.database.query_hooks.append(self.seen.append)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.database.query_hooks.remove(self.seen.append)


# -- threads --------------------------------------------------------------------------------


def test_threads_get_set_and_list_newest_first(storage: Any) -> None:
    a = put_thread(storage, "a", scope="s1", updatedAt=T0 + 1)
    b = put_thread(storage, "b", scope="s2", updatedAt=T0 + 3, title="B", state={"step": 2},
                   metadata={"k": 1})
    c = put_thread(storage, "c", agentName="other", updatedAt=T0 + 2)
    assert storage.memory.threads.get("b") == b
    assert storage.memory.threads.get("zzz") is None
    assert storage.memory.threads.list() == [b, c, a]
    assert storage.memory.threads.list(agent_name="agent") == [b, a]
    assert storage.memory.threads.list(agent_name="agent", scope="s1") == [a]
    assert storage.memory.threads.list(scope="s2") == [b]
    assert storage.memory.threads.list(agent_name="nobody") == []
    with Statements(storage.database) as sql:
        assert storage.memory.threads.list(limit=2) == [b, c]
    assert "LIMIT" in sql.seen[0].sql.upper() and 2 in sql.seen[0].params  # applied in SQL
    assert storage.memory.threads.list(limit=0) == []
    with pytest.raises(ValueError):
        storage.memory.threads.list(limit=-1)


def test_threads_set_refuses_a_record_of_another_id(storage: Any) -> None:
    with pytest.raises(RecordError, match="id"):
        storage.memory.threads.set("a", {"id": "b", "agentName": "agent", "createdAt": T0, "updatedAt": T0})
    assert storage.memory.threads.get("a") is None and storage.memory.threads.get("b") is None


def test_threads_create_never_overwrites(storage: Any) -> None:
    first = {"id": "a", "agentName": "agent", "scope": "s1", "createdAt": T0, "updatedAt": T0}
    assert storage.memory.threads.create("a", first) is None  # stored by this call
    second = {**first, "agentName": "other", "scope": "s2", "createdAt": T0 + 5, "updatedAt": T0 + 5}
    assert storage.memory.threads.create("a", second) == first  # the one that exists, kept
    assert storage.memory.threads.get("a") == first
    with pytest.raises(RecordError, match="id"):
        storage.memory.threads.create("b", first)
    assert storage.memory.threads.get("b") is None


def test_append_while_running_needs_the_run_running(storage: Any) -> None:
    # One message is one guarded INSERT, a batch a transaction: both checked.
    put_thread(storage, "t1")
    storage.runs.start("r1", "agent")
    storage.runs.finish("r1", "failed", {"type": "RUN_ERROR", "message": "gone"})
    for run in ("no-such-run", "r1"):
        for batch in ([msg(1)], [msg(1), msg(2)]):
            with pytest.raises(ConflictError, match=f"run '{run}' is not running"):
                storage.memory.messages.append("t1", batch, run_id=run, while_running=run)
    assert storage.memory.messages.list("t1") == []
    storage.runs.start("r2", "agent")
    for batch in ([msg(1)], [msg(2), msg(3)]):
        storage.memory.messages.append("t1", batch, run_id="r2", while_running="r2")
    assert [(m["id"], m["runId"]) for m in storage.memory.messages.list("t1")] == \
        [("m1", "r2"), ("m2", "r2"), ("m3", "r2")]


def test_threads_delete_removes_the_thread_and_its_messages(storage: Any) -> None:
    put_thread(storage, "a")
    put_thread(storage, "b")
    storage.memory.messages.append("a", [msg(1), msg(2)])
    kept = storage.memory.messages.append("b", [msg(3)])
    storage.memory.threads.delete("a")
    assert storage.memory.threads.get("a") is None
    assert storage.memory.messages.list("a") == []
    assert storage.memory.messages.list("b") == kept
    assert storage.list("memoryMessages")["items"] == kept
    storage.memory.threads.delete("a")  # absent: nothing to do


def test_a_failed_thread_delete_leaves_thread_and_messages(storage: Any) -> None:
    # A table of the user's own that references threads: deleting a referenced thread fails
    # on its foreign key, after the messages were deleted -- which must then be undone.
    Thread = storage.models.thread
    d = storage.dialect

    class Bookmark(peewee.Model):
        id = d.key(primary_key=True)
        thread = peewee.ForeignKeyField(Thread, field=Thread.id, column_name="thread_id")

        class Meta:
            database = storage.database
            table_name = "user_bookmarks"
            table_settings = list(d.table_settings)

    Bookmark.create_table()
    try:
        put_thread(storage, "a")
        storage.memory.messages.append("a", [msg(1), msg(2)])
        Bookmark.create(id="bm1", thread="a")
        before = snapshot(storage.database)
        with pytest.raises(ConflictError, match="'a'"):
            storage.memory.threads.delete("a")
        assert snapshot(storage.database) == before
        assert contents(storage.memory.messages.list("a")) == ["message 1", "message 2"]
    finally:
        Bookmark.drop_table()


# -- messages -------------------------------------------------------------------------------


def test_append_stores_better_agent_message_records(storage: Any) -> None:
    put_thread(storage, "t1")
    before = now_ms()
    records = storage.memory.messages.append(
        "t1", [msg(1), msg(2, "assistant", toolCalls=[{"id": "c1", "type": "function"}]),
               {"role": "tool", "content": "42", "toolCallId": "c1"}], run_id="run-1")
    after = now_ms()
    base = records[0]["createdAt"]
    assert before <= base <= after
    assert [r["createdAt"] for r in records] == [base, base + 1, base + 2]  # now + i
    assert records[0] == {"id": "m1", "role": "user", "content": "message 1", "threadId": "t1",
                          "runId": "run-1", "createdAt": base}
    assert isinstance(records[2]["id"], str) and records[2]["id"]  # a message without an id gets one
    for rec in records:
        key = f"t1:{rec['createdAt']}:{rec['id']}"  # Better Agent's record id
        assert storage.get("memoryMessages", key) == rec
    assert storage.memory.messages.list("t1") == records

    without_run = storage.memory.messages.append("t1", [msg(4, runId="stale", threadId="x", createdAt=1)])
    assert "runId" not in without_run[0]  # as Better Agent: the record's runId is the append's
    assert without_run[0]["threadId"] == "t1" and without_run[0]["createdAt"] > base + 2
    assert storage.memory.messages.append("t1", []) == []


def test_quick_successive_appends_keep_their_order(storage: Any) -> None:
    put_thread(storage, "t1")
    for i in range(0, 30, 3):  # faster than the clock moves by three milliseconds
        storage.memory.messages.append("t1", [msg(i), msg(i + 1), msg(i + 2)])
    listed = storage.memory.messages.list("t1")
    assert [r["id"] for r in listed] == [f"m{i}" for i in range(30)]
    assert len({r["createdAt"] for r in listed}) == 30


def test_append_to_a_missing_thread_fails_and_writes_nothing(storage: Any) -> None:
    before = snapshot(storage.database)
    with pytest.raises(NotFoundError, match="nope"):
        storage.memory.messages.append("nope", [msg(1), msg(2)])
    assert snapshot(storage.database) == before


def test_append_refuses_a_bad_message_and_writes_nothing(storage: Any) -> None:
    put_thread(storage, "t1")
    before = snapshot(storage.database)
    with pytest.raises(RecordError, match=r"messages\[2\]"):
        storage.memory.messages.append("t1", [msg(1), msg(2), msg(3, data=math.nan)])
    with pytest.raises(RecordError, match=r"messages\[1\]"):
        storage.memory.messages.append("t1", [msg(1), "not a message"])
    with pytest.raises(RecordError, match=r"messages\[0\].id"):
        storage.memory.messages.append("t1", [{"id": 7, "role": "user", "content": "x"}])
    with pytest.raises(RecordError):
        storage.memory.messages.append("t1", msg(1))  # one message, not a list
    assert snapshot(storage.database) == before


def test_a_batch_that_fails_in_the_database_leaves_nothing_behind(storage: Any) -> None:
    put_thread(storage, "t1")
    put_thread(storage, "decoy")
    batch = [msg(i) for i in range(249)] + [{"id": "last", "role": "user", "content": "last"}]
    # The batch goes in as three multi-row INSERTs. Right after the first, a row of another
    # thread takes the id the batch's last message will get (t1:<createdAt>:last), so the
    # third INSERT fails in the database, after two have run.
    M = storage.models.message
    inserts: List[str] = []

    def take_the_last_id(event: Any) -> None:
        if not event.sql.lstrip().upper().startswith("INSERT"):
            return
        inserts.append(event.sql)
        if len(inserts) == 1:
            created = int(event.params[0].split(":")[1])  # t1:<createdAt of message 0>:m0
            M.insert(id=f"t1:{created + 249}:last", thread="decoy", message={"role": "user"},
                     created_at=T0).execute()

    before = snapshot(storage.database)
    storage.database.query_hooks.append(take_the_last_id)
    try:
        with pytest.raises(ConflictError, match="nothing was written"):
            storage.memory.messages.append("t1", batch)
    finally:
        storage.database.query_hooks.remove(take_the_last_id)
    assert len([sql for sql in inserts if "messages" in sql]) == 4  # the batch's three and the decoy's
    assert snapshot(storage.database) == before  # nothing of the batch is left
    assert storage.memory.messages.list("t1") == []


def test_list_keeps_the_last_messages_in_sql(storage: Any) -> None:
    put_thread(storage, "t1")
    storage.memory.messages.append("t1", [msg(i) for i in range(300)])
    with Statements(storage.database) as sql:
        last = storage.memory.messages.list("t1", limit=20)
    assert [r["id"] for r in last] == [f"m{i}" for i in range(280, 300)]
    assert len(sql.seen) == 1 and "LIMIT" in sql.seen[0].sql.upper() and 20 in sql.seen[0].params
    assert storage.memory.messages.list("t1", limit=0) == []
    assert len(storage.memory.messages.list("t1", limit=1000)) == 300
    assert storage.memory.messages.list("nope", limit=5) == []
    with pytest.raises(ValueError):
        storage.memory.messages.list("t1", limit=-1)


def test_list_before_a_run_stops_at_its_first_message(storage: Any) -> None:
    put_thread(storage, "t1")
    storage.memory.messages.append("t1", [msg(1), msg(2, "assistant")], run_id="run-1")
    storage.memory.messages.append("t1", [msg(3), msg(4, "assistant")], run_id="run-2")
    storage.memory.messages.append("t1", [msg(5), msg(6, "assistant")], run_id="run-3")
    listing = storage.memory.messages.list
    assert contents(listing("t1", before_run_id="run-2")) == ["message 1", "message 2"]
    assert contents(listing("t1", before_run_id="run-3")) == [f"message {i}" for i in range(1, 5)]
    assert listing("t1", before_run_id="run-1") == []
    assert contents(listing("t1", before_run_id="run-3", limit=3)) == ["message 2", "message 3", "message 4"]
    # A run with no message in the thread cuts nothing (Better Agent's findIndex gives -1).
    assert len(listing("t1", before_run_id="run-9")) == 6
    assert contents(listing("t1", before_run_id="run-9", limit=1)) == ["message 6"]


# -- fork -----------------------------------------------------------------------------------


def test_fork_copies_the_thread_and_its_messages(storage: Any) -> None:
    source = put_thread(storage, "src", scope="s1", title="Trip", state={"step": 3}, metadata={"k": "v"})
    originals = storage.memory.messages.append("src", [msg(1), msg(2, "assistant")], run_id="run-1")
    before = now_ms()
    forked = storage.memory.fork("copy", "src")
    assert before <= forked["createdAt"] == forked["updatedAt"] <= now_ms()
    assert forked == {**source, "id": "copy", "createdAt": forked["createdAt"],
                      "updatedAt": forked["updatedAt"]}
    assert storage.memory.threads.get("copy") == forked
    copies = storage.memory.messages.list("copy")
    assert [{k: v for k, v in m.items() if k != "createdAt"} for m in copies] == [
        {"id": "m1", "role": "user", "content": "message 1", "threadId": "copy"},
        {"id": "m2", "role": "assistant", "content": "message 2", "threadId": "copy"},
    ]  # re-appended: new thread, new createdAt, no runId
    assert all(c["createdAt"] >= forked["createdAt"] for c in copies)
    assert storage.memory.messages.list("src") == originals
    assert storage.memory.threads.get("src") == source


def test_fork_passes_the_messages_through_transform(storage: Any) -> None:
    put_thread(storage, "src")
    storage.memory.messages.append("src", [msg(1), msg(2), msg(3)], run_id="run-1")
    seen: List[Any] = []

    def transform(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        seen.append(messages)
        return [{**m, "content": m["content"].upper()} for m in messages[:2]]

    storage.memory.fork("copy", "src", transform)
    assert seen == [[msg(1), msg(2), msg(3)]]  # without threadId, runId, createdAt
    assert contents(storage.memory.messages.list("copy")) == ["MESSAGE 1", "MESSAGE 2"]

    storage.memory.fork("empty", "src", lambda messages: [])
    assert storage.memory.threads.get("empty") is not None
    assert storage.memory.messages.list("empty") == []


def test_fork_of_a_missing_thread_is_not_found(storage: Any) -> None:
    before = snapshot(storage.database)
    with pytest.raises(NotFoundError, match="nope"):
        storage.memory.fork("copy", "nope")
    assert snapshot(storage.database) == before


def test_a_failed_fork_leaves_no_copy(storage: Any) -> None:
    put_thread(storage, "src")
    storage.memory.messages.append("src", [msg(1)])
    before = snapshot(storage.database)
    with pytest.raises(RecordError):
        storage.memory.fork("copy", "src", lambda messages: [{"id": "x", "role": "user", "bad": math.inf}])
    assert snapshot(storage.database) == before  # the new thread was rolled back with the messages
    assert storage.memory.threads.get("copy") is None
