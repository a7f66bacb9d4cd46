"""Many followers: the shared poller behind `storage.streams.resume`, on all three dialects.

Every follower gets every event exactly once and in seq order, whether it was there from
the start or joined mid-stream; it ends with the right `reason`; it holds no connection;
a dropped follower is forgotten; a forked child follows with its own poller. Nothing here
asserts a duration (latency and cost are measured by bench/ W9, W12 and W13).
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import peewee
import pytest

from better_agent_peewee import ConflictError, NotFoundError, create_tables, peewee_storage
from better_agent_peewee.streams import HEARTBEAT
from tests.test_streams import POOLED, stored_events


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


class Reader(threading.Thread):
    """Follows one stream with `resume` in its own thread; collects items, the reason and any error."""

    def __init__(self, storage: Any, run_id: str, after_seq: int = 0, **options: Any) -> None:
        super().__init__(daemon=True)
        self.storage, self.run_id, self.after_seq = storage, run_id, after_seq
        options.setdefault("timeout", 120)  # a safety net: the tests end the streams long before
        self.options = options
        self.items: List[Dict[str, Any]] = []
        self.reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.following = threading.Event()
        self.start()
        self.following.wait(60)

    def run(self) -> None:
        try:
            follower = self.storage.streams.resume(self.run_id, self.after_seq, **self.options)
            self.following.set()
            for item in follower:
                self.items.append(item)
            self.reason = follower.reason
        except BaseException as exc:
            self.error = exc
        finally:
            self.following.set()

    def finished(self) -> Reader:
        self.join(120)
        assert not self.is_alive(), f"follower of {self.run_id} did not end"
        assert self.error is None, self.error
        return self


def expected(storage: Any, run_id: str, after: int = 0) -> List[Dict[str, Any]]:
    return [{**e["event"], "seq": e["seq"]} for e in stored_events(storage, run_id) if e["seq"] > after]


def write(storage: Any, run_id: str, count: int, tag: str) -> None:
    """Append `count` events to `run_id`, some one by one, some in batches."""
    try:
        i = 0
        while i < count:
            if i % 7 == 3:
                n = min(5, count - i)
                storage.streams.append_many(run_id,
                                            [{"type": "DELTA", "w": tag, "i": i + k} for k in range(n)])
                i += n
            else:
                storage.streams.append(run_id, {"type": "DELTA", "w": tag, "i": i})
                i += 1
    finally:
        storage.database.close()


def test_many_followers_of_many_streams_get_every_event_once_in_order(storage: Any) -> None:
    runs = [f"run-{k}" for k in range(6)]
    for run_id in runs:
        storage.streams.open(run_id)
    readers = [Reader(storage, run_id) for run_id in runs for _ in range(4)]
    writers = [threading.Thread(target=write, args=(storage, run_id, 150, f"{run_id}/{w}"))
               for run_id in runs for w in range(2)]
    for t in writers:
        t.start()
    # Followers joining mid-stream, from wherever the stream has got to.
    late = []
    for run_id in runs:
        after = len(stored_events(storage, run_id))
        late.append((Reader(storage, run_id, after), after))
    for t in writers:
        t.join()
    for run_id in runs:
        storage.streams.append(run_id, {"type": "RUN_FINISHED"})
        storage.streams.close(run_id)  # right after the last event: every follower must still get it
    for r in readers:
        r.finished()
        assert r.items == expected(storage, r.run_id)
        assert r.reason == "closed"
        assert r.items[-1]["type"] == "RUN_FINISHED"
    for r, after in late:
        r.finished()
        assert r.items == expected(storage, r.run_id, after)
        assert [i["seq"] for i in r.items] == list(range(after + 1, after + 1 + len(r.items)))
        assert r.reason == "closed"


def test_reasons_closed_deleted_stopped_timeout(storage: Any) -> None:
    for run_id in ("a", "b", "c", "d"):
        storage.streams.open(run_id)
        storage.streams.append(run_id, {"type": "E"})
    closing, deleting = Reader(storage, "a"), Reader(storage, "b")
    stop = threading.Event()
    stopping = Reader(storage, "c", stop=stop, timeout=None)
    timing_out = Reader(storage, "d", timeout=0.2)
    storage.streams.close("a")
    storage.delete("streams", "b")
    stop.set()
    assert closing.finished().reason == "closed" and closing.items == [{"type": "E", "seq": 1}]
    assert deleting.finished().reason == "deleted" and deleting.items == [{"type": "E", "seq": 1}]
    assert stopping.finished().reason == "stopped"
    assert timing_out.finished().reason == "timeout" and timing_out.items == [{"type": "E", "seq": 1}]

    follower = storage.streams.resume("d")
    assert follower.reason is None
    assert next(follower) == {"type": "E", "seq": 1}
    follower.close()
    assert follower.reason == "stopped" and list(follower) == []

    with pytest.raises(NotFoundError):
        storage.streams.resume("b")  # deleted: nothing to follow


def test_heartbeats_while_the_stream_is_quiet(storage: Any) -> None:
    storage.streams.open("quiet")
    follower = storage.streams.resume("quiet", heartbeat=0.05, timeout=60)
    assert next(follower) is HEARTBEAT
    assert next(follower) is HEARTBEAT
    storage.streams.append("quiet", {"type": "E"})
    item = next(follower)
    while item is HEARTBEAT:
        item = next(follower)
    assert item == {"type": "E", "seq": 1}
    storage.streams.close("quiet")
    assert [i for i in follower if i is not HEARTBEAT] == []
    assert follower.reason == "closed"
    with pytest.raises(ValueError, match="heartbeat"):
        storage.streams.resume("quiet", heartbeat=0)


def test_a_follower_that_saw_the_close_has_every_event(storage: Any) -> None:
    # The close races the appends of other threads: whatever was stored before it is delivered,
    # and nothing can be appended after it.
    for round_ in range(5):
        run_id = f"race-{round_}"
        storage.streams.open(run_id)
        readers = [Reader(storage, run_id) for _ in range(3)]
        refused: List[BaseException] = []

        def appender(run_id: str = run_id, refused: List[BaseException] = refused) -> None:
            try:
                for i in range(1_000_000):  # until the close refuses one
                    storage.streams.append(run_id, {"i": i})
            except ConflictError as exc:
                refused.append(exc)
            finally:
                storage.database.close()

        threads = [threading.Thread(target=appender) for _ in range(2)]
        for t in threads:
            t.start()
        while len(stored_events(storage, run_id)) < 20:
            time.sleep(0.001)
        storage.streams.close(run_id)
        for t in threads:
            t.join()
        assert len(refused) == 2 and "closed" in str(refused[0])
        for r in readers:
            assert r.finished().items == expected(storage, run_id)
            assert r.reason == "closed"


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
                                     pytest.param("mysql", marks=pytest.mark.mysql, id="mysql")])
def test_an_append_held_up_inside_its_statement_keeps_a_racing_close_waiting(
        dialect: str, storage: Any, make_database: Any) -> None:
    # The race above, made certain, where writers run at once: the append is held up inside its
    # statement (another connection holds an uncommitted row with the number it takes) while the
    # stream is closed. Either the close waits for it (the append holds the stream row shared:
    # PostgreSQL) or the append, once let go, finds the stream closed and stores nothing
    # (MariaDB holds it up before it reads the stream row). Without the lock, PostgreSQL
    # commits the close at once and the held-up append stores its event after it, unseen by a
    # follower that ended at the close.
    storage.streams.open("held")
    blocker = make_database()
    quote = '"' if dialect == "postgres" else "`"
    blocker.begin()
    blocker.execute_sql(f"INSERT INTO stream_events (id, run_id, seq, {quote}timestamp{quote}, event) "
                        "VALUES ('held:1', 'held', 1, %s, '{}')", (datetime.datetime(2026, 1, 1),))
    done: Dict[str, Any] = {}

    def append() -> None:
        try:
            done["seq"] = storage.streams.append("held", {"type": "HELD"})
        except ConflictError as exc:
            done["refused"] = exc
        finally:
            storage.database.close()

    def close() -> None:
        storage.streams.close("held")
        done["closed"] = True
        storage.database.close()

    appender = threading.Thread(target=append, daemon=True)
    appender.start()
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
               if dialect == "postgres" else
               "SELECT count(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'INSERT INTO%%held%%'")
    watcher = make_database()
    deadline = time.monotonic() + 30
    while watcher.execute_sql(waiting).fetchone()[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the append waits on the blocker's row
    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(1.0)  # long enough for an unhindered close to commit
    closed_while_append_was_held = done.get("closed", False)
    blocker.rollback()
    appender.join(60)
    closer.join(60)
    assert not appender.is_alive() and not closer.is_alive()
    if "seq" in done:  # it landed: then before the close, which waited for it
        assert done["seq"] == 1
        assert not closed_while_append_was_held, "an event was stored after the stream's close"
    else:
        assert "closed" in str(done["refused"])
    follower = storage.streams.resume("held")
    assert [e["seq"] for e in follower] == ([1] if "seq" in done else []) and follower.reason == "closed"


def test_appending_to_a_closed_stream_is_refused_and_writes_nothing(storage: Any) -> None:
    storage.streams.open("done")
    storage.streams.append("done", {"type": "E"})
    storage.streams.close("done")
    with pytest.raises(ConflictError, match="'done' is closed"):
        storage.streams.append("done", {"type": "LATE"})
    with pytest.raises(ConflictError, match="'done' is closed"):
        storage.streams.append_many("done", [{"type": "LATE"}, {"type": "LATER"}])
    with pytest.raises(ConflictError, match="'done' is closed"):
        storage.streams.append_many("done", [])
    assert [e["seq"] for e in stored_events(storage, "done")] == [1]
    # Opened again (a new stream record), it takes events once more.
    storage.streams.open("done")
    assert storage.streams.append("done", {"type": "AGAIN"}) == 2


def test_a_dropped_follower_is_forgotten_and_the_poller_goes_with_the_last(storage: Any) -> None:
    storage.streams.open("r")
    storage.streams.append("r", {"type": "E"})
    poller = storage.streams.poller()
    follower = storage.streams.resume("r")
    assert next(follower)["seq"] == 1
    assert "r" in poller.followed
    del follower  # never closed, never exhausted
    gc.collect()
    assert "r" not in poller.followed
    deadline = time.monotonic() + 60
    while poller._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert poller._thread is None, "the poller thread outlived its last follower"
    # And a new follower starts it again.
    storage.streams.close("r")
    assert [i["seq"] for i in storage.streams.resume("r")] == [1]


def connections(database: peewee.Database, dialect: str) -> int:
    """Sessions the server has open for the test database (not counting the one asking)."""
    if dialect == "postgres":
        sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
               "AND pid <> pg_backend_pid()")
    else:
        sql = ("SELECT COUNT(*) FROM information_schema.processlist "
               "WHERE db = DATABASE() AND id <> CONNECTION_ID()")
    return int(database.execute_sql(sql).fetchone()[0])


def test_three_hundred_followers_share_one_connection(dialect: str, make_database: Any) -> None:
    # More followers than a default PostgreSQL allows connections (100): each polling on its own
    # connection would fail; they share the poller's.
    db = make_database()
    create_tables(db)
    storage = peewee_storage(db)
    runs = [f"r{k}" for k in range(30)]
    for run_id in runs:
        storage.streams.open(run_id)
    readers = [Reader(storage, run_id, poll_interval=0.01) for run_id in runs for _ in range(10)]
    if dialect != "sqlite":
        assert connections(db, dialect) <= 1  # the poller's (this thread's own is not counted)
    for k, run_id in enumerate(runs):
        storage.streams.append_many(run_id, [{"k": k, "i": i} for i in range(40)])
        storage.streams.close(run_id)
    for r in readers:
        assert r.finished().items == expected(storage, r.run_id)


@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
def test_followers_in_a_pre_forked_worker_pool(dialect: str, make_database: Any, database_url: str,
                                              pooled: bool) -> None:
    # As a pre-forking server does: the parent is already following (its poller runs) when
    # it forks; each child follows with a poller and connection of its own, and the parent's
    # poller is unharmed by the children (their copy of its connection is never used).
    if pooled:
        cls, options = POOLED[dialect]
        db = make_database(cls, **options, max_connections=4, timeout=30)
    else:
        db = make_database()
    create_tables(db)
    storage = peewee_storage(db)
    storage.streams.open("shared")
    storage.streams.append("shared", {"i": 0})
    parent = Reader(storage, "shared")
    while not parent.items:
        time.sleep(0.01)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    # Daemons, and terminated if still there: a child that hangs fails this test instead of
    # hanging the whole run (multiprocessing joins non-daemon children at exit).
    children = [context.Process(target=_child_follows, args=(storage, "shared", results), daemon=True)
                for _ in range(3)]
    for child in children:
        child.start()
    try:
        ready = [results.get(timeout=60) for _ in children]
        assert ready == ["following"] * 3
        for i in range(1, 30):
            storage.streams.append("shared", {"i": i})
        storage.streams.close("shared")
        got = [results.get(timeout=120) for _ in children]
        for child in children:
            child.join(60)
            assert child.exitcode == 0
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(10)
    want = expected(storage, "shared")
    assert all(g == want for g in got), got
    assert parent.finished().items == want
    # The parent's poller still works after the children exited.
    storage.streams.open("after")
    storage.streams.append("after", {"i": 1})
    late = Reader(storage, "after")
    storage.streams.close("after")
    assert late.finished().items == [{"i": 1, "seq": 1}]


def _child_follows(storage: Any, run_id: str, results: Any) -> None:
    try:
        follower = storage.streams.resume(run_id, timeout=120)
        results.put("following")
        results.put(list(follower))
    except BaseException as exc:  # reported to the parent
        results.put(repr(exc))
    finally:
        results.close()
        results.join_thread()  # (put() hands the item to a thread that _exit would kill)
        os._exit(0)


def test_forks_in_a_loop_while_the_poller_is_busy(make_database: Any, database_url: str) -> None:
    # A fork copies only the forking thread: a lock the poller thread held at that moment (inside
    # SQLite: its global mutexes, the unix VFS's lock) stays locked for ever in the child, which
    # then hangs at its first statement. Forks wait for the poller to leave its statement. (The
    # appends come from another process: a thread of ours appending could be caught the same way,
    # and that would be the application's fork, not the poller's.)
    db = make_database()
    create_tables(db)
    storage = peewee_storage(db)
    storage.streams.open("done")
    storage.streams.append_many("done", [{"i": i} for i in range(3)])
    storage.streams.close("done")
    runs = [f"busy{k}" for k in range(20)]
    for run_id in runs:
        storage.streams.open(run_id)
    storage.database.close()
    readers = [Reader(storage, run_id, poll_interval=0.001) for run_id in runs]
    code = ("import sys, itertools; from better_agent_peewee import peewee_storage; "
            "from better_agent_peewee.cli import open_database; "
            "s = peewee_storage(open_database(sys.argv[1])); runs = sys.argv[2:]; "
            "[s.streams.append(runs[i % len(runs)], {'i': i}) for i in itertools.count()]")
    writer = subprocess.Popen([sys.executable, "-c", code, database_url, *runs])
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = []
    try:
        for _ in range(100):
            child = context.Process(target=_child_reads, args=(storage, "done", results), daemon=True)
            child.start()
            children.append(child)
            child.join(30)
            assert child.exitcode == 0, "a child forked while the poller was busy hung or failed"
            assert results.get(timeout=30) == 3
    finally:
        writer.kill()
        writer.wait(30)
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(10)
    for run_id in runs:
        storage.streams.close(run_id)
    for r in readers:
        assert r.finished().items == expected(storage, r.run_id)


def _child_reads(storage: Any, run_id: str, results: Any) -> None:
    try:
        results.put(len(list(storage.streams.resume(run_id, timeout=20))))
    except BaseException as exc:  # reported to the parent
        results.put(repr(exc))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


@pytest.mark.sqlite
def test_an_in_memory_sqlite_database_is_followed_on_the_callers_thread() -> None:
    db = peewee.SqliteDatabase(":memory:")
    create_tables(db)
    storage = peewee_storage(db)
    storage.streams.open("m")
    storage.streams.append_many("m", [{"i": 0}, {"i": 1}])
    follower = storage.streams.resume("m", poll_interval=0.01, timeout=30)
    assert next(follower) == {"i": 0, "seq": 1}
    storage.streams.append("m", {"i": 2})
    storage.streams.close("m")
    assert list(follower) == [{"i": 1, "seq": 2}, {"i": 2, "seq": 3}]
    assert follower.reason == "closed"
    db.close()


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_postgres_followers_are_pushed_appends_of_other_processes(dialect: str, storage: Any,
                                                                 database_url: str) -> None:
    # LISTEN/NOTIFY is PostgreSQL's.
    storage.streams.open("pushed")
    # A poll interval far beyond the test's patience: only a NOTIFY can deliver the events.
    reader = Reader(storage, "pushed", poll_interval=3600)
    poller = storage.streams.poller()
    assert poller.listening
    import subprocess
    import sys
    code = ("import sys; from better_agent_peewee import peewee_storage; from better_agent_peewee.cli import "
            "open_database; s = peewee_storage(open_database(sys.argv[1])); "
            "[s.streams.append('pushed', {'i': i}) for i in range(5)]; s.streams.close('pushed')")
    subprocess.run([sys.executable, "-c", code, database_url], check=True, timeout=120)
    assert reader.finished().items == [{"i": i, "seq": i + 1} for i in range(5)]


def _wait_for(condition: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("dialect", [pytest.param("mysql", marks=pytest.mark.mysql)])
def test_mysql_prepared_checks_see_other_writers_and_recover_a_lost_or_foreign_statement(
        dialect: str, make_database: Any) -> None:
    # Idle streams are checked by a statement PREPAREd on the poller's connection. A writer that
    # does not poke this poller (another storage: as another process) must still be seen: by the
    # prepared statement, by the array of streams that moved since it was written, after the
    # statement was replaced by another one of the same name (told by its token), and after the
    # poller's session was killed (a new session has no statement).
    db = make_database()
    create_tables(db)
    storage = peewee_storage(db)
    other = peewee_storage(make_database())
    runs = [f"idle{k}" for k in range(40)]
    for run_id in runs:
        storage.streams.open(run_id)
    readers = {run_id: Reader(storage, run_id) for run_id in runs}
    poller = storage.streams.poller()
    _wait_for(lambda: len(poller.reader.checks._prepared.get(0, (None, 0, {}))[2]) == len(runs),
              "the check of every stream to be prepared")

    def deliver(run_id: str, i: int) -> None:
        other.streams.append(run_id, {"i": i})
        _wait_for(lambda: len(readers[run_id].items) == i + 1, f"event {i} of {run_id}")

    deliver("idle0", 0)  # seen by the prepared statement
    deliver("idle0", 1)  # idle0 has moved since it was written: seen by the array beside it
    deliver("idle1", 0)
    token = poller.reader.checks._prepared[0][1]
    raw = make_database()
    raw.execute_sql("SELECT 1")
    # Another statement under the same name, on the poller's own connection (as another poller on
    # a pooled connection would leave it): the token tells it apart.
    prepared = poller.reader.checks._prepared[0]
    poller.reader.checks._prepared[0] = (prepared[0], token ^ 1, prepared[2])
    deliver("idle2", 0)
    _wait_for(lambda: poller.reader.checks._prepared.get(0, prepared)[1] not in (token, token ^ 1),
              "the check to be prepared anew")
    conn = poller._conn
    raw.execute_sql(f"KILL CONNECTION {int(conn.thread_id())}")
    deliver("idle3", 0)
    _wait_for(lambda: poller.reader.checks._prepared.get(0, prepared)[0] not in (conn, None),
              "a check prepared on the new session")
    deliver("idle0", 2)
    for run_id in runs:
        other.streams.close(run_id)
    for run_id, reader in readers.items():
        assert reader.finished().items == expected(storage, run_id)
        assert reader.reason == "closed"
