"""storage.streams: open / append / append_many / close / resume ("Streams" in docs/contract.md).

Seq numbering is proven under real concurrency (threads and processes), and `resume`
against live writers; nothing here asserts a duration.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import threading
from typing import Any, Dict, List

import peewee
import pytest
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

from better_agent_peewee import (
    ConflictError,
    NotFoundError,
    RecordError,
    create_tables,
    peewee_storage,
)
from better_agent_peewee.records import now_ms
from better_agent_peewee.streams import POLL_BATCH
from tests.samples import counting, snapshot

T0 = 1_700_000_000_000


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def stored_events(storage: Any, run_id: str) -> List[Dict[str, Any]]:
    return storage.list("streamEvents", {"where": {"runId": run_id}, "orderBy": {"seq": "asc"}})["items"]


def foreign_event(storage: Any, event_id: str) -> None:
    """A row whose id is `event_id` but which belongs to another run: an obstacle no append expects."""
    E = storage.models.stream_event
    E.insert(id=event_id, run_id="someone-else", seq=10_000, timestamp=T0, event={"type": "X"}).execute()


# -- open / close ---------------------------------------------------------------------------


def test_open_writes_an_open_stream_and_close_closes_it(storage: Any) -> None:
    before = now_ms()
    storage.streams.open("r1")
    after = now_ms()
    rec = storage.streams.get("r1")
    assert rec == {"runId": "r1", "status": "open", "createdAt": rec["createdAt"],
                   "updatedAt": rec["createdAt"]}
    assert before <= rec["createdAt"] <= after
    assert storage.get("streams", "r1") == rec  # the same record Better Agent reads

    storage.streams.close("r1")
    closed = storage.streams.get("r1")
    assert closed["status"] == "closed"
    assert closed["createdAt"] == rec["createdAt"]
    assert closed["closedAt"] == closed["updatedAt"] >= rec["updatedAt"]


def test_close_of_a_missing_stream_does_nothing(storage: Any) -> None:
    before = snapshot(storage.database)
    storage.streams.close("nope")
    assert snapshot(storage.database) == before


def test_a_second_close_only_restamps_the_stream(storage: Any) -> None:
    storage.streams.open("r1")
    storage.streams.append("r1", {"type": "RUN_STARTED"})
    storage.streams.close("r1")
    first = storage.streams.get("r1")
    events_before = snapshot(storage.database)["stream_events"]
    storage.streams.close("r1")  # allowed, not refused
    again = storage.streams.get("r1")
    assert again["status"] == "closed" and again["createdAt"] == first["createdAt"]
    assert again["closedAt"] == again["updatedAt"] >= first["closedAt"]
    assert snapshot(storage.database)["stream_events"] == events_before
    with pytest.raises(ConflictError, match="closed"):
        storage.streams.append("r1", {"type": "LATE"})


def test_close_refuses_an_open_status(storage: Any) -> None:
    storage.streams.open("r1")
    with pytest.raises(RecordError, match="status"):
        storage.streams.close("r1", status="open")
    assert storage.streams.get("r1")["status"] == "open"


# -- append ---------------------------------------------------------------------------------


def test_append_numbers_events_and_stores_better_agent_records(storage: Any) -> None:
    storage.streams.open("r1")
    before = now_ms()
    seqs = [
        storage.streams.append("r1", {"type": "RUN_STARTED", "timestamp": T0}),
        storage.streams.append("r1", {"type": "TEXT_MESSAGE_CONTENT", "delta": "hi", "timestamp": T0 + 1.0}),
        storage.streams.append("r1", {"type": "RUN_FINISHED", "timestamp": "not a number"}),
    ]
    after = now_ms()
    assert seqs == [1, 2, 3]
    stored = stored_events(storage, "r1")
    assert stored[:2] == [
        {"id": "r1:1", "runId": "r1", "seq": 1, "timestamp": T0,
         "event": {"type": "RUN_STARTED", "timestamp": T0}},
        {"id": "r1:2", "runId": "r1", "seq": 2, "timestamp": T0 + 1,
         "event": {"type": "TEXT_MESSAGE_CONTENT", "delta": "hi", "timestamp": T0 + 1.0}},
    ]
    assert stored[2]["id"] == "r1:3"
    assert before <= stored[2]["timestamp"] <= after  # no numeric timestamp: now
    assert storage.get("streamEvents", "r1:2") == stored[1]


def test_append_to_a_missing_stream_fails_and_writes_nothing(storage: Any) -> None:
    before = snapshot(storage.database)
    with pytest.raises(NotFoundError, match="nope"):
        storage.streams.append("nope", {"type": "X"})
    with pytest.raises(NotFoundError, match="nope"):
        storage.streams.append_many("nope", [{"type": "X"}, {"type": "Y"}])
    with pytest.raises(NotFoundError, match="nope"):
        storage.streams.append_many("nope", [])
    assert snapshot(storage.database) == before


def test_append_refuses_what_it_cannot_store(storage: Any) -> None:
    storage.streams.open("r1")
    before = snapshot(storage.database)
    for bad in ("text", ["a list"], {"type": "X", "value": math.nan}, {"type": "X", "s": "nul\x00"}):
        with pytest.raises(RecordError, match="event"):
            storage.streams.append("r1", bad)
    with pytest.raises(RecordError, match=r"event\[2\]"):
        storage.streams.append_many("r1", [{"type": "A"}, {"type": "B"}, {"type": "C", "x": math.inf}])
    assert snapshot(storage.database) == before
    assert storage.streams.append("r1", {"type": "ok"}) == 1


def test_an_append_is_one_statement_in_the_common_case(storage: Any) -> None:
    storage.streams.open("r1")
    seqs, statements = counting(storage.database,
                                lambda: [storage.streams.append("r1", {"i": i}) for i in range(10)])
    assert seqs == list(range(1, 11))
    assert len(statements) == 10


def test_writers_that_do_not_know_the_last_seq_continue_it(storage: Any, make_database: Any) -> None:
    # Two storage objects (as two processes would have): each one's idea of the next seq goes
    # stale as the other appends, and the check in the insert catches it.
    other = peewee_storage(make_database())
    storage.streams.open("r1")
    assert storage.streams.append("r1", {"by": "a"}) == 1
    assert storage.streams.append("r1", {"by": "a"}) == 2
    assert other.streams.append("r1", {"by": "b"}) == 3
    assert storage.streams.append("r1", {"by": "a"}) == 4
    assert other.streams.append_many("r1", [{"by": "b"}, {"by": "b"}]) == [5, 6]
    assert storage.streams.append_many("r1", [{"by": "a"}]) == [7]
    # Reopening keeps the events: the next append goes after them, not over them.
    other.streams.open("r1")
    assert other.streams.append("r1", {"by": "b"}) == 8
    assert [e["seq"] for e in stored_events(storage, "r1")] == list(range(1, 9))


def test_a_writer_whose_stream_was_recreated_elsewhere_starts_again_at_one(storage: Any, make_database: Any
                                                                          ) -> None:
    # This writer expects seq 4 next; meanwhile another process deleted the stream and its
    # events and opened it anew. Storing 4 now would leave a gap: the insert must notice.
    storage.streams.open("r1")
    assert storage.streams.append_many("r1", [{"i": i} for i in range(3)]) == [1, 2, 3]
    other = peewee_storage(make_database())
    for seq in (1, 2, 3):
        other.delete("streamEvents", f"r1:{seq}")
    other.streams.open("r1")
    assert storage.streams.append("r1", {"i": "again"}) == 1
    assert storage.streams.append_many("r1", [{"i": "more"}]) == [2]
    assert [e["seq"] for e in stored_events(storage, "r1")] == [1, 2]


def test_appends_inside_a_transaction_commit_or_roll_back_with_it(storage: Any) -> None:
    storage.streams.open("r1")
    with storage.transaction():
        assert storage.streams.append("r1", {"i": 1}) == 1
        assert storage.streams.append_many("r1", [{"i": 2}, {"i": 3}]) == [2, 3]
    with pytest.raises(RuntimeError):
        with storage.transaction():
            assert storage.streams.append_many("r1", [{"i": 4}, {"i": 5}]) == [4, 5]
            raise RuntimeError("undo")
    # The rolled-back numbers are free again: no gap where the undone events were.
    assert storage.streams.append("r1", {"i": "after"}) == 4
    assert [e["event"]["i"] for e in stored_events(storage, "r1")] == [1, 2, 3, "after"]


def test_append_gives_up_clearly_when_a_foreign_row_holds_the_id(storage: Any) -> None:
    storage.streams.open("r1")
    foreign_event(storage, "r1:1")
    with pytest.raises(ConflictError, match="r1:1"):
        storage.streams.append("r1", {"type": "X"})
    assert stored_events(storage, "r1") == []


# -- append_many ----------------------------------------------------------------------------


def test_append_many_numbers_a_batch_consecutively(storage: Any) -> None:
    storage.streams.open("r1")
    assert storage.streams.append("r1", {"i": 0}) == 1
    seqs = storage.streams.append_many("r1", ({"i": i} for i in range(1, 251)))
    assert seqs == list(range(2, 252))
    assert storage.streams.append_many("r1", []) == []
    assert storage.streams.append("r1", {"i": 251}) == 252
    stored = stored_events(storage, "r1")
    assert [e["seq"] for e in stored] == list(range(1, 253))
    assert [e["event"]["i"] for e in stored] == list(range(252))
    assert all(e["id"] == f"r1:{e['seq']}" for e in stored)


def test_a_failed_append_many_leaves_nothing_behind(storage: Any) -> None:
    storage.streams.open("r1")
    storage.streams.append("r1", {"i": 0})
    # The batch's event 240 would be r1:241, in its third multi-row INSERT; a row of another
    # run already holds that id. The INSERTs before it ran, and must be rolled back.
    foreign_event(storage, "r1:241")
    before = snapshot(storage.database)
    statements: List[str] = []
    storage.database.query_hooks.append(lambda event: statements.append(event.sql))
    with pytest.raises(ConflictError, match="r1"):
        storage.streams.append_many("r1", [{"i": i} for i in range(1, 251)])
    storage.database.query_hooks.clear()
    assert len([s for s in statements if s.lstrip().upper().startswith("INSERT")]) >= 3
    assert snapshot(storage.database) == before
    assert [e["seq"] for e in stored_events(storage, "r1")] == [1]
    assert storage.streams.append("r1", {"i": 1}) == 2  # the stream is still usable


# -- concurrency ----------------------------------------------------------------------------

THREADS, PROCESSES, PER_WRITER = 8, 2, 500


def _process_writer(url: str, run_id: str, writer: int, count: int, results: Any) -> None:
    """A writer process: its own database object from the URL, `count` appends."""
    from playhouse.db_url import connect

    db = connect(url)
    try:
        storage = peewee_storage(db)
        for i in range(count):
            storage.streams.append(run_id, {"type": "P", "writer": writer, "i": i})
        results.put(("ok", writer))
    except BaseException as exc:  # report, don't hang the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        db.close()


def test_concurrent_threads_and_processes_number_every_event_once(
        storage: Any, database_url: str) -> None:
    storage.streams.open("by-threads")
    storage.streams.open("by-processes")
    storage.database.close()

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding connections
    results = ctx.Queue()
    processes = [ctx.Process(target=_process_writer,
                             args=(database_url, "by-processes", w, PER_WRITER, results))
                 for w in range(PROCESSES)]
    for p in processes:
        p.start()

    errors: List[BaseException] = []
    start = threading.Barrier(THREADS)
    # Half the threads share the storage object (its appenders take turns), the other half
    # each have their own, and so race in the database like separate processes do.
    storages = [storage if w % 2 == 0 else peewee_storage(storage.database) for w in range(THREADS)]

    def thread_writer(writer: int) -> None:
        try:
            start.wait()
            for i in range(PER_WRITER):
                storages[writer].streams.append("by-threads", {"type": "T", "writer": writer, "i": i})
        except BaseException as exc:
            errors.append(exc)
        finally:
            storage.database.close()

    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    outcomes = [results.get(timeout=300) for _ in processes]
    for p in processes:
        p.join(timeout=60)

    assert errors == []
    assert sorted(outcomes) == [("ok", w) for w in range(PROCESSES)]
    for run_id, writers in (("by-threads", THREADS), ("by-processes", PROCESSES)):
        stored = stored_events(storage, run_id)
        total = writers * PER_WRITER
        assert [e["seq"] for e in stored] == list(range(1, total + 1))  # no gap, no duplicate
        assert all(e["id"] == f"{run_id}:{e['seq']}" for e in stored)
        written = sorted((e["event"]["writer"], e["event"]["i"]) for e in stored)
        # none lost or overwritten
        assert written == [(w, i) for w in range(writers) for i in range(PER_WRITER)]
        for w in range(writers):  # each writer's events keep its order
            mine = [e["event"]["i"] for e in stored if e["event"]["writer"] == w]
            assert mine == list(range(PER_WRITER))


# -- resume ---------------------------------------------------------------------------------


def follow_in_thread(storage: Any, run_id: str, **options: Any) -> Any:
    """Start a thread collecting `resume(run_id)`; returns (thread, received, errors)."""
    received: List[Dict[str, Any]] = []
    errors: List[BaseException] = []
    options.setdefault("poll_interval", 0.005)
    options.setdefault("timeout", 120)  # a safety net: the tests end the stream long before
    ready = threading.Event()

    def follow() -> None:
        try:
            iterator = storage.streams.resume(run_id, **options)
            ready.set()
            for item in iterator:
                received.append(item)
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()
            storage.database.close()

    thread = threading.Thread(target=follow)
    thread.start()
    ready.wait(30)
    return thread, received, errors


def test_resume_follows_live_writers_to_the_close(storage: Any) -> None:
    storage.streams.open("live")
    storage.streams.append("live", {"type": "RUN_STARTED", "n": 0})
    reader, received, errors = follow_in_thread(storage, "live")

    def writer(w: int) -> None:
        try:
            for i in range(300):
                storage.streams.append("live", {"type": "DELTA", "writer": w, "i": i})
                if i % 50 == 0:
                    storage.streams.append_many("live", [{"type": "BATCH", "writer": w, "i": i, "k": k}
                                                         for k in range(3)])
        finally:
            storage.database.close()

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    storage.streams.append("live", {"type": "RUN_FINISHED"})
    storage.streams.close("live")  # right after the last event: the reader must still get it
    reader.join(timeout=120)

    assert not reader.is_alive(), "resume did not end after the stream closed"
    assert errors == []
    stored = stored_events(storage, "live")
    assert [item["seq"] for item in received] == list(range(1, len(stored) + 1))
    assert received == [{**e["event"], "seq": e["seq"]} for e in stored]
    assert received[-1]["type"] == "RUN_FINISHED"


def test_resume_yields_events_after_a_seq_and_ends_on_a_closed_stream(storage: Any) -> None:
    storage.streams.open("r1")
    storage.streams.append_many("r1", [{"type": "E", "i": i} for i in range(5)])
    storage.streams.close("r1")
    assert list(storage.streams.resume("r1", 2)) == [{"type": "E", "i": i, "seq": i + 1} for i in range(2, 5)]
    assert list(storage.streams.resume("r1", 5)) == []
    assert len(list(storage.streams.resume("r1"))) == 5


def test_resume_of_a_missing_stream_fails_at_once(storage: Any) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        storage.streams.resume("nope")  # at the call, not at the first next()


def test_resume_reads_a_long_stream_window_by_window(storage: Any) -> None:
    total = 2 * POLL_BATCH + 234
    storage.streams.open("long")
    storage.streams.append_many("long", [{"i": i} for i in range(total)])
    storage.streams.close("long")
    polls: List[Any] = []
    storage.database.query_hooks.append(lambda event: polls.append(event.params))
    items = list(storage.streams.resume("long", poll_interval=60))  # never needs to wait
    assert [item["i"] for item in items] == list(range(total))
    assert [item["seq"] for item in items] == list(range(1, total + 1))
    # Each poll asks only for a window of seqs after the last one seen (never re-reads the stream).
    assert [window for p in polls for window in poll_windows(p, storage.dialect.name)] == \
        [(0, POLL_BATCH), (POLL_BATCH, 2 * POLL_BATCH), (2 * POLL_BATCH, 3 * POLL_BATCH)]


def poll_windows(params: Any, dialect: str) -> List[Any]:
    """The (after, upto] windows a poll statement asked for: arrays on PostgreSQL, a JSON array on
    SQLite, one stream's bounds on MariaDB (whose JSON array only asks which streams have news)."""
    params = list(params)
    if len(params) == 3 and all(isinstance(p, list) for p in params):
        return list(zip(params[1], params[2]))
    if len(params) == 1 and isinstance(params[0], str) and params[0].startswith("[[") and dialect == "sqlite":
        return [(after, upto) for _run, after, upto in json.loads(params[0])]
    if len(params) == 4 and isinstance(params[1], int) and params[0] == params[3]:  # MariaDB: one stream
        return [(params[1], params[2])]
    return []  # another statement


def test_resume_skips_gaps_in_the_numbering(storage: Any) -> None:
    # Rows written by someone else with holes in seq: every event is still yielded once.
    storage.streams.open("gappy")
    for seq in (1, 2, 3, 1500, 1501, 4000):
        storage.set("streamEvents", f"gappy:{seq}",
                    {"id": f"gappy:{seq}", "runId": "gappy", "seq": seq, "timestamp": T0,
                     "event": {"n": seq}})
    storage.streams.close("gappy")
    assert [item["seq"] for item in storage.streams.resume("gappy", poll_interval=60)] == \
        [1, 2, 3, 1500, 1501, 4000]


def test_resume_ends_quietly_when_the_stream_is_deleted(storage: Any) -> None:
    storage.streams.open("doomed")
    storage.streams.append("doomed", {"type": "E"})
    reader, received, errors = follow_in_thread(storage, "doomed")
    storage.delete("streams", "doomed")
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert errors == []
    assert received == [{"type": "E", "seq": 1}]


def test_resume_stops_when_asked_or_when_the_time_is_up(storage: Any) -> None:
    storage.streams.open("open")
    storage.streams.append("open", {"type": "E"})
    stop = threading.Event()
    reader, received, errors = follow_in_thread(storage, "open", stop=stop, timeout=None)
    stop.set()
    reader.join(timeout=60)
    assert not reader.is_alive() and errors == []

    reader, received, errors = follow_in_thread(storage, "open", timeout=0.05)
    reader.join(timeout=60)
    assert not reader.is_alive() and errors == []
    assert received == [{"type": "E", "seq": 1}]
    assert storage.streams.get("open")["status"] == "open"


def test_resume_rejects_bad_arguments(storage: Any) -> None:
    storage.streams.open("r1")
    for kwargs in ({"after_seq": -1}, {"after_seq": "3"}, {"poll_interval": 0}, {"timeout": -1}):
        with pytest.raises(ValueError):
            storage.streams.resume("r1", **kwargs)


# The pooled class of each dialect (a pooled SQLite connection moves between threads).
POOLED = {"sqlite": (PooledSqliteDatabase, {"check_same_thread": False}),
          "postgres": (PooledPostgresqlDatabase, {}), "mysql": (PooledMySQLDatabase, {})}


def pooled_database(dialect: str, make_database: Any, **kwargs: Any) -> Any:
    cls, options = POOLED[dialect]
    return make_database(cls, **options, **kwargs)


def test_a_follower_holds_no_pooled_connection(dialect: str, make_database: Any) -> None:
    # Two connections in the pool: the poller's (one for all followers) and the writer's.
    db = pooled_database(dialect, make_database, max_connections=2, timeout=30)
    create_tables(db)
    storage = peewee_storage(db)
    storage.streams.open("pooled")
    db.close()

    received: List[Dict[str, Any]] = []
    held: List[bool] = []
    errors: List[BaseException] = []
    first = threading.Event()

    def follow() -> None:
        try:
            for item in storage.streams.resume("pooled", poll_interval=0.005, timeout=120):
                held.append(not db.is_closed())  # while the caller handles an event
                received.append(item)
                first.set()
        except BaseException as exc:
            errors.append(exc)
        finally:
            first.set()

    reader = threading.Thread(target=follow)
    reader.start()
    for i in range(20):
        with db.connection_context():
            storage.streams.append("pooled", {"i": i})
        if i == 0:
            first.wait(30)
    with db.connection_context():
        storage.streams.close("pooled")
    reader.join(timeout=120)

    assert not reader.is_alive() and errors == []
    assert [item["i"] for item in received] == list(range(20))
    assert held == [False] * 20
    assert db.is_closed()


def test_a_follower_leaves_a_connection_it_did_not_open_alone(dialect: str, make_database: Any) -> None:
    db = pooled_database(dialect, make_database, max_connections=2)
    create_tables(db)
    storage = peewee_storage(db)
    storage.streams.open("r1")
    storage.streams.append("r1", {"i": 0})
    storage.streams.close("r1")
    db.connect(reuse_if_open=True)
    conn = db.connection()
    assert list(storage.streams.resume("r1")) == [{"i": 0, "seq": 1}]
    assert not db.is_closed() and db.connection() is conn
    db.close()
