"""Bad input: the right error class, a message naming the culprit, nothing written.

Every case runs against a database seeded with one full record per table, and compares
all five tables before and after: a refused `set` must neither insert nor replace.
The seeded database is shared by the cases of one dialect (a refused call writes
nothing, which is exactly what each case checks).
"""
from __future__ import annotations

import datetime as dt
import threading
from typing import Any, Callable, Iterator, List, Type

import pytest

from better_agent_peewee import (
    ConflictError,
    NotFoundError,
    QueryError,
    RecordError,
    StorageError,
    UnsupportedTableError,
    peewee_storage,
)
from better_agent_peewee.timestamps import MAX_TIMESTAMP_MS
from tests.samples import (
    DIALECT_PARAMS,
    SAMPLES,
    T0,
    event,
    expected_read,
    fresh,
    message,
    message_key,
    module_database,
    run,
    seed_parents,
    snapshot,
    stream,
    thread,
)


@pytest.fixture(scope="module", params=DIALECT_PARAMS)
def storage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A storage seeded with one full record per table (plus a message in thread t1)."""
    for db in module_database(request, request.param, tmp_path_factory):
        s = peewee_storage(db)
        seed_parents(s)
        for table, sample in SAMPLES.items():
            s.set(table, sample.key, fresh(sample.full))
        yield s


def refused(storage: Any, error: Type[Exception], culprits: List[str], call: Callable[[], Any]) -> Exception:
    """Run `call`; it must raise `error` (a StorageError) naming every culprit, and write nothing."""
    before = snapshot(storage.database)
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, StorageError)
    for culprit in culprits:
        assert culprit in str(info.value), f"{culprit!r} not named in: {info.value}"
    assert snapshot(storage.database) == before, "a refused call wrote something"
    return info.value


# -- unknown table ------------------------------------------------------------------------

@pytest.mark.parametrize("verb, args", [
    ("set", ("threads", "t1", thread())),
    ("set", ("memorythreads", "t1", thread())),
    ("get", ("agent_runs", "r1")),
    ("delete", ("stream_events", "r1:1")),
    ("list", ("Runs", None)),
])
def test_unknown_table(storage: Any, verb: str, args: tuple) -> None:
    error = refused(storage, UnsupportedTableError, [repr(args[0])], lambda: getattr(storage, verb)(*args))
    assert str(error) == f"Storage table {args[0]!r} is not supported"


# -- list queries -------------------------------------------------------------------------

THREAD_FIELDS = ["agentName", "createdAt", "id", "scope", "title", "updatedAt"]


@pytest.mark.parametrize("table, query, culprits", [
    # where / orderBy naming something that is not a field of the table: the allowed ones are listed
    ("memoryThreads", {"where": {"bogus": "x"}}, ["memoryThreads", "'bogus'", *THREAD_FIELDS]),
    # a column, not a field
    ("memoryThreads", {"where": {"agent_name": "x"}}, ["'agent_name'", *THREAD_FIELDS]),
    ("memoryThreads", {"where": {"state": None}}, ["'state'", *THREAD_FIELDS]),  # JSON: not filterable
    ("memoryThreads", {"orderBy": {"updated_at": "asc"}}, ["orderBy", "'updated_at'", *THREAD_FIELDS]),
    ("runs", {"orderBy": {"startedAt": "desc", "createdAt": "desc"}}, ["runs", "'createdAt'", "startedAt",
                                                                      "finishedAt", "status"]),
    ("memoryMessages", {"where": {"role": "user"}}, ["'role'", "threadId", "createdAt", "runId"]),
    ("streamEvents", {"orderBy": {"event": "asc"}}, ["'event'", "seq", "timestamp"]),
    ("streams", {"where": {1: "x"}}, ["1", "runId", "status", "closedAt"]),
    # directions
    ("runs", {"orderBy": {"startedAt": "up"}}, ["startedAt", "'up'", "asc", "desc"]),
    ("runs", {"orderBy": {"startedAt": "DESC"}}, ["startedAt", "'DESC'"]),
    ("runs", {"orderBy": {"startedAt": None}}, ["startedAt", "None"]),
    ("runs", {"orderBy": {"startedAt": True}}, ["startedAt", "True"]),
    # take
    ("runs", {"take": -1}, ["take", "-1"]),
    ("runs", {"take": 1.5}, ["take", "1.5"]),
    ("runs", {"take": "3"}, ["take", "'3'"]),
    ("runs", {"take": True}, ["take", "True"]),
    ("runs", {"take": False}, ["take", "False"]),
    # where values of the wrong kind
    ("runs", {"where": {"startedAt": "2023-11-14T22:13:20.000Z"}}, ["startedAt", "2023-11-14"]),
    ("runs", {"where": {"startedAt": 1.5}}, ["startedAt", "1.5"]),
    ("runs", {"where": {"startedAt": True}}, ["startedAt", "True"]),
    ("runs", {"where": {"agentName": ["a", "b"]}}, ["agentName", "['a', 'b']"]),
    ("streamEvents", {"where": {"seq": "1"}}, ["seq", "'1'"]),
    # the query itself
    ("runs", {"limit": 5}, ["'limit'"]),
    ("runs", {"where": [("agentName", "a")]}, ["where", "list"]),
    ("runs", {"orderBy": ["startedAt"]}, ["orderBy", "list"]),
    ("runs", "startedAt", ["query", "str"]),
])
def test_bad_list_query(storage: Any, table: str, query: Any, culprits: List[str]) -> None:
    refused(storage, QueryError, culprits, lambda: storage.list(table, query))


def test_nul_in_a_where_value(storage: Any) -> None:
    """PostgreSQL cannot even bind a NUL: every dialect answers alike."""
    refused(storage, QueryError, ["agentName", "NUL"],
            lambda: storage.list("memoryThreads", {"where": {"agentName": "a\x00b"}}))


# -- records: missing and wrong fields ----------------------------------------------------

REQUIRED = [(table, field) for table, fields in {
    "memoryThreads": ["agentName", "createdAt", "updatedAt"],
    "memoryMessages": ["id", "role", "threadId", "createdAt"],
    "runs": ["agentName", "status", "startedAt", "updatedAt"],
    "streams": ["status", "createdAt", "updatedAt"],
    "streamEvents": ["runId", "seq", "timestamp", "event"],
}.items() for field in fields]


@pytest.mark.parametrize("table, field", REQUIRED)
@pytest.mark.parametrize("how", ["absent", "None"])
def test_missing_required_field(storage: Any, table: str, field: str, how: str) -> None:
    sample = SAMPLES[table]
    rec = fresh(sample.minimal)
    if how == "absent":
        del rec[field]
    else:
        rec[field] = None
    refused(storage, RecordError, [f"{table}.{field}", "required"],
            lambda: storage.set(table, sample.key, rec))


def _set(table: str, key: Any, rec: Any) -> Callable[[Any], None]:
    return lambda storage: storage.set(table, key, rec)


MID = message_key(message())
BAD_RECORDS = [
    # timestamps: epoch-ms ints only
    ("ts-str", "memoryThreads", "t1", thread(createdAt="1700000000000"), ["memoryThreads.createdAt", "str"]),
    ("ts-iso", "runs", "r1", run(startedAt="2023-11-14T22:13:20.000Z"), ["runs.startedAt", "2023-11-14"]),
    ("ts-float", "memoryThreads", "t1", thread(updatedAt=1.7e12), ["memoryThreads.updatedAt", "float"]),
    ("ts-bool", "streams", "r1", stream(createdAt=True), ["streams.createdAt", "bool"]),
    ("ts-datetime", "runs", "r1", run(finishedAt=dt.datetime(2024, 1, 1)), ["runs.finishedAt", "datetime"]),
    ("ts-negative", "streamEvents", "r1:1", event(timestamp=-1), ["streamEvents.timestamp", "-1"]),
    ("ts-too-big", "runs", "r1", run(abortRequestedAt=MAX_TIMESTAMP_MS + 1),
     ["runs.abortRequestedAt", str(MAX_TIMESTAMP_MS + 1)]),
    ("ts-message", "memoryMessages", MID, message(createdAt="x"), ["memoryMessages.createdAt", "'x'"]),
    # statuses
    ("status-run", "runs", "r1", run(status="done"), ["runs.status", "'done'", "running", "aborted"]),
    ("status-run-case", "runs", "r1", run(status="Running"), ["runs.status", "'Running'"]),
    ("status-run-int", "runs", "r1", run(status=1), ["runs.status", "1"]),
    ("status-stream", "streams", "r1", stream(status="running"),
     ["streams.status", "'running'", "open", "closed"]),
    # seq
    ("seq-str", "streamEvents", "r1:1", event(seq="1"), ["streamEvents.seq", "'1'"]),
    ("seq-zero", "streamEvents", "r1:0", event(seq=0), ["streamEvents.seq", "0"]),
    ("seq-negative", "streamEvents", "r1:-1", event(seq=-1), ["streamEvents.seq", "-1"]),
    ("seq-bool", "streamEvents", "r1:True", event(seq=True), ["streamEvents.seq", "True"]),
    ("seq-float", "streamEvents", "r1:1.0", event(seq=1.0), ["streamEvents.seq", "1.0"]),
    ("seq-too-big", "streamEvents", f"r1:{2**31}", event(seq=2**31), ["streamEvents.seq", str(2**31)]),
    # other fields of the wrong type
    ("text-int", "memoryThreads", "t1", thread(agentName=5), ["memoryThreads.agentName", "int"]),
    ("text-list", "memoryThreads", "t1", thread(scope=["a"]), ["memoryThreads.scope", "list"]),
    ("title-bytes", "memoryThreads", "t1", thread(title=b"x"), ["memoryThreads.title", "bytes"]),
    ("metadata-str", "memoryThreads", "t1", thread(metadata="x"), ["memoryThreads.metadata", "str"]),
    ("metadata-list", "memoryThreads", "t1", thread(metadata=[1]), ["memoryThreads.metadata", "list"]),
    ("final-event-type", "runs", "r1", run(finalEvent={"type": "TEXT_MESSAGE_END"}),
     ["runs.finalEvent", "TEXT_MESSAGE_END", "RUN_FINISHED"]),
    ("final-event-str", "runs", "r1", run(finalEvent="RUN_FINISHED"), ["runs.finalEvent"]),
    ("event-str", "streamEvents", "r1:1", event(event="RUN_STARTED"), ["streamEvents.event", "str"]),
    ("message-role", "memoryMessages", MID, message(role=3), ["memoryMessages.role", "int"]),
    ("message-id-int", "memoryMessages", "t1:1700000000000:7", message(mid=7), ["memoryMessages.id", "int"]),
    ("thread-id-int", "memoryMessages", "7:1700000000000:m1", message(thread_id=7),
     ["memoryMessages.threadId"]),
    ("unknown-field", "memoryThreads", "t1", thread(agent_name="x"), ["memoryThreads.agent_name", "unknown"]),
    ("unknown-field-run", "runs", "r1", run(createdAt=T0), ["runs.createdAt", "unknown"]),
    ("id-too-long", "memoryThreads", "t" * 256, thread("t" * 256), ["memoryThreads.id", "256", "255"]),
    ("id-empty", "runs", "", run(""), ["runs.runId", "empty"]),
    ("id-int", "memoryThreads", 5, thread(5), ["memoryThreads.id", "int"]),
    ("id-none", "streams", None, stream(None), ["streams.id", "None"]),
    # a record key that contradicts the id it is stored under
    ("thread-id", "memoryThreads", "t1", thread("t2"), ["memoryThreads.id", "'t2'", "'t1'"]),
    ("run-id", "runs", "r1", run("r2"), ["runs.runId", "'r2'", "'r1'"]),
    ("stream-run-id", "streams", "r1", stream("r2"), ["streams.runId", "'r2'", "'r1'"]),
    ("stream-id", "streams", "r1", stream(id="r2"), ["streams.id", "'r2'", "'r1'"]),
    ("event-id-seq", "streamEvents", "r1:2", event(seq=1, id="r1:2"), ["streamEvents.id", "r1:2", "r1:1"]),
    ("event-id-run", "streamEvents", "r2:1", event(id="r2:1"), ["streamEvents.id", "r2:1", "r1:1"]),
    ("event-record-id", "streamEvents", "r1:1", event(id="r1:9"), ["streamEvents.id", "'r1:9'", "'r1:1'"]),
    ("message-id-scheme", "memoryMessages", "t1:1700000000000:m2", message(),
     ["memoryMessages.id", "t1:1700000000000:m2", "t1:1700000000000:m1"]),
    ("message-created", "memoryMessages", "t1:1700000000001:m1", message(),
     ["memoryMessages.id", "t1:1700000000001:m1", "t1:1700000000000:m1"]),
    ("message-thread", "memoryMessages", "t2:1700000000000:m1", message(),
     ["memoryMessages.id", "t2:1700000000000:m1", "t1:1700000000000:m1"]),
    ("message-bare-id", "memoryMessages", "m1", message(), ["memoryMessages.id", "'m1'"]),
    # NUL characters: in ids, in text columns, inside JSON ("Values" in docs/contract.md)
    ("nul-id", "memoryThreads", "t\x001", thread("t\x001"), ["memoryThreads.id", "NUL"]),
    ("nul-run-id", "runs", "r\x00", run("r\x00"), ["runs.runId", "NUL"]),
    ("nul-agent", "memoryThreads", "t1", thread(agentName="a\x00"), ["memoryThreads.agentName", "NUL"]),
    ("nul-title", "memoryThreads", "t1", thread(title="x\x00y"), ["memoryThreads.title", "NUL"]),
    ("nul-scope", "runs", "r1", run(scope="\x00"), ["runs.scope", "NUL"]),
    ("nul-message-run-id", "memoryMessages", MID, message(runId="r\x00"), ["memoryMessages.runId", "NUL"]),
    ("nul-message-thread", "memoryMessages", MID, message(thread_id="t\x00"),
     ["memoryMessages.threadId", "NUL"]),
    ("nul-content", "memoryMessages", MID, message(content="a\x00b"), ["memoryMessages.content", "NUL"]),
    ("nul-state-value", "memoryThreads", "t1", thread(state=["ok", {"x": "\x00"}]),
     ["memoryThreads.state", "NUL"]),
    ("nul-state-key", "memoryThreads", "t1", thread(state={"a\x00": 1}), ["memoryThreads.state", "NUL"]),
    ("nul-metadata", "memoryThreads", "t1", thread(metadata={"m": "\x00"}),
     ["memoryThreads.metadata", "NUL"]),
    ("nul-config", "runs", "r1", run(config="\x00"), ["runs.config", "NUL"]),
    ("nul-final-event", "runs", "r1", run(finalEvent={"type": "RUN_ERROR", "message": "\x00"}),
     ["runs.finalEvent", "NUL"]),
    ("nul-event", "streamEvents", "r1:1", event(event={"type": "X", "delta": "\x00"}),
     ["streamEvents.event", "NUL"]),
    ("nul-event-run", "streamEvents", "r\x00:1", event("r\x00"), ["streamEvents", "NUL"]),
    ("surrogate-title", "memoryThreads", "t1", thread(title="\ud800"), ["memoryThreads.title", "surrogate"]),
    ("surrogate-state", "memoryThreads", "t1", thread(state={"s": "\udfff"}),
     ["memoryThreads.state", "surrogate"]),
    # NaN and infinities anywhere in JSON
    ("nan-state", "memoryThreads", "t1", thread(state=float("nan")), ["memoryThreads.state", "nan"]),
    ("inf-config", "runs", "r1", run(config={"x": float("inf")}), ["runs.config", "inf"]),
    ("neg-inf-event", "streamEvents", "r1:1", event(event={"type": "X", "v": [float("-inf")]}),
     ["streamEvents.event", "-inf"]),
    ("nan-metadata", "memoryThreads", "t1", thread(metadata={"n": [1, float("nan")]}),
     ["memoryThreads.metadata", "nan"]),
    ("nan-content", "memoryMessages", MID, message(content=float("nan")), ["memoryMessages.content", "nan"]),
    ("inf-tool-calls", "memoryMessages", MID, message(toolCalls=[{"x": float("inf")}]),
     ["memoryMessages.toolCalls", "inf"]),
    # values JSON cannot serialise
    ("set-state", "memoryThreads", "t1", thread(state={1, 2}), ["memoryThreads.state", "set"]),
    ("object-config", "runs", "r1", run(config={"o": object()}), ["runs.config", "object"]),
    ("datetime-event", "streamEvents", "r1:1", event(event={"type": "X", "at": dt.datetime(2024, 1, 1)}),
     ["streamEvents.event", "datetime"]),
    ("bytes-content", "memoryMessages", MID, message(content=b"raw"), ["memoryMessages.content", "bytes"]),
    # not a record at all
    ("list-record", "memoryThreads", "t1", [("id", "t1")], ["memoryThreads", "dict", "list"]),
    ("str-record", "runs", "r1", "r1", ["runs", "dict", "str"]),
    ("none-record", "streams", "r1", None, ["streams", "dict", "NoneType"]),
    ("none-message", "memoryMessages", MID, None, ["memoryMessages", "dict"]),
]


@pytest.mark.parametrize("table, key, rec, culprits",
                         [pytest.param(t, k, r, c, id=i) for i, t, k, r, c in BAD_RECORDS])
def test_bad_record(storage: Any, table: str, key: Any, rec: Any, culprits: List[str]) -> None:
    refused(storage, RecordError, culprits, lambda: storage.set(table, key, fresh(rec)))


def test_seeded_records_are_intact(storage: Any) -> None:
    """After all the refusals above, every seeded record still reads back unchanged."""
    for table, sample in SAMPLES.items():
        assert storage.get(table, sample.key) == expected_read(table, sample.full)


def test_nul_in_an_id_reads_as_absent_and_deletes_nothing(storage: Any) -> None:
    before = snapshot(storage.database)
    for table in SAMPLES:
        assert storage.get(table, "t1\x00") is None
        storage.delete(table, "t1\x00")
    assert snapshot(storage.database) == before


# -- constraints --------------------------------------------------------------------------

def test_message_of_a_missing_thread(storage: Any) -> None:
    rec = message("m9", thread_id="ghost")
    error = refused(storage, NotFoundError, ["memoryMessages", "'ghost'"],
                    lambda: storage.set("memoryMessages", message_key(rec), rec))
    assert error.table == "memoryThreads" and error.key == "ghost"


def test_message_of_a_missing_thread_from_another_thread(storage: Any) -> None:
    """Each OS thread has its own connection; foreign keys must hold on every one (SQLite pragma)."""
    rec = message("m9", thread_id="ghost")
    outcome: List[Any] = []

    def work() -> None:
        try:
            storage.set("memoryMessages", message_key(rec), rec)
            outcome.append("written")
        except Exception as exc:  # handed to the test thread
            outcome.append(exc)
        finally:
            storage.database.close()

    before = snapshot(storage.database)
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert isinstance(outcome[-1], NotFoundError), outcome
    assert "'ghost'" in str(outcome[-1])
    assert snapshot(storage.database) == before


def test_deleting_a_thread_that_has_messages(storage: Any) -> None:
    refused(storage, ConflictError, ["memoryThreads", "'t1'", "messages"],
            lambda: storage.delete("memoryThreads", "t1"))
    assert storage.get("memoryThreads", "t1") is not None
    assert storage.get("memoryMessages", SAMPLES["memoryMessages"].key) is not None
