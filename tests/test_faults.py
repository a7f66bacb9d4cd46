"""Server faults: PostgreSQL and MariaDB restarted under a running workload.

What is proved, on a plain and on a pooled database:

* the operation in flight when the server goes away either succeeds or raises
  `ConnectionLostError` (a StorageError, and a peewee.OperationalError); nothing else;
* every operation *started* once the server is back succeeds: the storage drops the
  dead connection and reconnects by itself (no caller rebuilds anything);
* nothing is half-written: message batches, event batches (`append_many`) and thread
  deletes are all-or-nothing, stream seqs stay exactly 1..N, no event is stored twice;
* every acknowledged write is readable afterwards;
* inside a transaction nothing is retried: the whole transaction is gone.

Faults: fast shutdown + start (`Server.restart()`) and kill + crash recovery
(`restart(crash=True)`: PostgreSQL immediate shutdown, MariaDB SIGKILL). The server is
restarted from the test's main thread only (the test servers die with the thread that
started them).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import peewee
import pytest
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase

from better_agent_peewee import (
    ConnectionLostError,
    StorageError,
    create_tables,
    forkguard,
    peewee_storage,
    reap_stale,
)
from better_agent_peewee.records import now_ms
from tests.samples import thread

NETWORK_DIALECTS = [pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
                    pytest.param("mysql", marks=pytest.mark.mysql, id="mysql")]


@pytest.fixture(params=NETWORK_DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    """Only the dialects with a server to restart (overrides conftest's `dialect`)."""
    return request.param


@pytest.fixture(autouse=True)
def _own_server(server: Any) -> None:
    """Restart only servers this run started: a server given by URL (BAP_TEST_*_URL, the cluster
    suite's proxies and clusters) is left alone, and its faults are the cluster suite's."""
    if not server.managed:
        pytest.skip(f"{server.dialect} server given by URL: not ours to restart")


def make_storage(make_database: Callable[..., peewee.Database], dialect: str, pooled: bool,
                 **options: Any) -> Any:
    if pooled:
        cls = PooledPostgresqlDatabase if dialect == "postgres" else PooledMySQLDatabase
        db = make_database(cls, max_connections=12, timeout=10)
    else:
        db = make_database()
    create_tables(db)
    return peewee_storage(db, **options)


# -- the workload -------------------------------------------------------------------------------


class Op:
    """One call of the workload: what, when, how it ended."""

    __slots__ = ("name", "start", "end", "error")

    def __init__(self, name: str, start: float, end: float, error: Optional[BaseException]) -> None:
        self.name, self.start, self.end, self.error = name, start, end, error


class Worker(threading.Thread):
    """Runs the mixed workload on the shared storage until `stop`, recording every call."""

    def __init__(self, storage: Any, n: int, stop: threading.Event) -> None:
        super().__init__(name=f"worker-{n}", daemon=True)
        self.s, self.n, self.stop = storage, n, stop
        self.ops: List[Op] = []
        self.tid = f"w{n}-thread"
        self.sid = f"w{n}-stream"
        # Ledgers: what was attempted and what was acknowledged.
        self.message_batches: Dict[str, bool] = {}  # batch id -> acknowledged
        self.event_batches: Dict[str, Tuple[int, bool]] = {}  # batch id -> (size, acknowledged)
        self.acked_seqs: List[Tuple[str, List[int]]] = []  # (batch id, seqs) in ack order
        self.deletes: Dict[str, bool] = {}  # thread id -> delete acknowledged
        self.finished_runs: List[str] = []
        self.crash: Optional[BaseException] = None

    def call(self, name: str, fn: Callable[[], Any]) -> Tuple[bool, Any]:
        start = time.monotonic()
        try:
            result = fn()
        except ConnectionLostError as exc:
            self.ops.append(Op(name, start, time.monotonic(), exc))
            return False, None
        except BaseException as exc:  # anything else is a failure of the test; keep it for the report
            self.ops.append(Op(name, start, time.monotonic(), exc))
            raise
        self.ops.append(Op(name, start, time.monotonic(), None))
        return True, result

    def setup(self) -> None:
        s = self.s
        s.memory.threads.set(self.tid, thread(self.tid, agentName=f"agent-{self.n}"))
        s.streams.open(self.sid)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.crash = exc

    def _loop(self) -> None:
        s, n = self.s, self.n
        i = 0
        while not self.stop.is_set():
            i += 1
            self.call("threads.set", lambda i=i: s.memory.threads.set(
                self.tid, thread(self.tid, agentName=f"agent-{n}", title=f"round {i}")))
            self.call("get", lambda: s.get("memoryThreads", self.tid))
            batch = f"m{n}-{i}"
            self.message_batches[batch] = False
            ok, _ = self.call("messages.append", lambda batch=batch: s.memory.messages.append(
                self.tid,
                [{"id": f"{batch}-{k}", "role": "user", "content": batch, "k": k} for k in range(10)]))
            self.message_batches[batch] = ok
            ebatch = f"e{n}-{i}"
            self.event_batches[ebatch] = (20, False)
            ok, seqs = self.call("streams.append_many", lambda ebatch=ebatch: s.streams.append_many(
                self.sid, [{"type": "CUSTOM", "batch": ebatch, "k": k} for k in range(20)]))
            self.event_batches[ebatch] = (20, ok)
            if ok:
                self.acked_seqs.append((ebatch, seqs))
            single = f"x{n}-{i}"
            self.event_batches[single] = (1, False)
            ok, seq = self.call("streams.append", lambda single=single: s.streams.append(
                self.sid, {"type": "CUSTOM", "batch": single, "k": 0}))
            self.event_batches[single] = (1, ok)
            if ok:
                self.acked_seqs.append((single, [seq]))
            rid = f"w{n}-run-{i}"
            ok, _ = self.call("runs.start",
                              lambda rid=rid: s.runs.start(rid, f"agent-{n}", thread_id=self.tid))
            if ok:
                self.call("runs.request_abort", lambda rid=rid: s.runs.request_abort(rid))
                ok, _ = self.call("runs.finish", lambda rid=rid: s.runs.finish(
                    rid, "aborted", {"type": "RUN_ERROR", "message": "stopped"}))
                if ok:
                    self.finished_runs.append(rid)
            self.call("list", lambda: s.list("runs", {"where": {"agentName": f"agent-{n}"},
                                                      "orderBy": {"startedAt": "desc"}, "take": 3}))
            self.call("messages.list", lambda: s.memory.messages.list(self.tid, limit=5))
            if i % 3 == 0:
                dtid = f"w{n}-doomed-{i}"
                ok, _ = self.call("doomed.set", lambda dtid=dtid: s.memory.threads.set(dtid, thread(dtid)))
                if ok:
                    ok, _ = self.call("doomed.append", lambda dtid=dtid: s.memory.messages.append(
                        dtid, [{"role": "user", "content": str(k)} for k in range(30)]))
                if ok:
                    self.deletes[dtid] = False
                    ok, _ = self.call("threads.delete", lambda dtid=dtid: s.memory.threads.delete(dtid))
                    self.deletes[dtid] = ok


#: Calls in one round of `Worker._loop` (without the every-third-round delete).
ROUND_CALLS = 10
#: Seconds every worker gets to come back after the last restart (well under one when quiet).
RECOVERY_DEADLINE = 60.0


def calls_since(worker: Worker, since: float) -> int:
    """How many of `worker`'s finished calls started after `since` (monotonic seconds)."""
    n = 0
    for op in reversed(worker.ops):  # (one worker's calls are recorded in the order they start)
        if op.start <= since:
            break
        n += 1
    return n


def run_with_faults(storage: Any, server: Any, faults: List[bool], workers: int = 4,
                    pause: float = 0.35) -> Tuple[List[Worker], List[Tuple[float, float]]]:
    """Run the workload while restarting the server once per entry of `faults` (True: crash)."""
    stop = threading.Event()
    crew = [Worker(storage, n, stop) for n in range(workers)]
    for w in crew:
        w.setup()
    for w in crew:
        w.start()
    windows: List[Tuple[float, float]] = []  # (went down, back up)
    try:
        for crash in faults:
            time.sleep(pause)
            down = time.monotonic()
            server.restart(crash=crash)
            windows.append((down, time.monotonic()))
        time.sleep(pause)
        # The pause alone is not enough: under load a worker may still sleep in the reconnect
        # backoff (up to 0.8 s a pause) well after the server is back. Wait until every worker
        # has made a round's worth of calls since the last restart (failed ones count: the
        # checks below report them).
        up, deadline = windows[-1][1], time.monotonic() + RECOVERY_DEADLINE
        while time.monotonic() < deadline and \
                any(w.is_alive() and calls_since(w, up) < ROUND_CALLS for w in crew):
            time.sleep(0.02)
    finally:
        stop.set()
        for w in crew:
            w.join(30)
    for w in crew:
        assert not w.is_alive(), f"{w.name} hangs"
        if w.crash is not None:
            raise AssertionError(f"{w.name} got an error that is not ConnectionLostError") from w.crash
    return crew, windows


def overlaps(op: Op, windows: List[Tuple[float, float]]) -> bool:
    """True when the call was running at some point while the server was down or restarting."""
    return any(op.start <= up and op.end >= down for down, up in windows)


# -- checks ---------------------------------------------------------------------------------------


def check_invariants(storage: Any, crew: List[Worker]) -> Dict[str, int]:
    """Everything acknowledged is there; nothing is half-written or written twice."""
    s = storage
    counts: Counter = Counter()
    for w in crew:
        # Messages: each batch all or nothing, acknowledged ones present, in batch order.
        msgs = s.memory.messages.list(w.tid)
        by_batch: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for m in msgs:
            by_batch[m["content"]].append(m)
        for batch, acked in w.message_batches.items():
            got = by_batch.pop(batch, [])
            assert len(got) in (0, 10), f"message batch {batch} half-written: {len(got)} of 10"
            if acked:
                assert len(got) == 10, f"acknowledged message batch {batch} is missing"
            assert [m["k"] for m in got] == list(range(len(got))), f"batch {batch} out of order"
            counts["messages"] += len(got)
        assert not by_batch, f"messages nobody wrote: {list(by_batch)[:3]}"

        # Events: seq exactly 1..N, batches all or nothing and consecutive, no event twice.
        events = [{**e["event"], "seq": e["seq"]} for e in s.list(
            "streamEvents", {"where": {"runId": w.sid}, "orderBy": {"seq": "asc"}})["items"]]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), f"{w.sid}: seqs not 1..N"
        seen: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
        for e in events:
            seen[e["batch"]].append((e["k"], e["seq"]))
        for batch, (size, acked) in w.event_batches.items():
            stored = seen.pop(batch, [])
            assert len(stored) in (0, size), \
                f"event batch {batch} half-written ({len(stored)} of {size}) or doubled"
            if acked:
                assert stored, f"acknowledged event batch {batch} is missing"
            if stored:
                ks, seqs = zip(*stored)
                assert list(ks) == list(range(size)), f"event batch {batch} out of order"
                assert list(seqs) == list(range(seqs[0], seqs[0] + size)), \
                    f"event batch {batch} not consecutive"
            counts["events"] += len(stored)
        assert not seen, f"events nobody wrote: {list(seen)[:3]}"
        by_seq = {e["seq"]: e["batch"] for e in events}
        for batch, seqs in w.acked_seqs:
            assert all(by_seq.get(q) == batch for q in seqs), \
                f"acknowledged seqs of {batch} hold other events"

        # Thread deletes: the thread and its 30 messages, both or neither.
        for dtid, acked in w.deletes.items():
            present = s.memory.threads.get(dtid) is not None
            n = len(s.memory.messages.list(dtid))
            assert (present, n) in ((True, 30), (False, 0)), \
                f"delete of {dtid} half done: thread {present}, {n} msgs"
            if acked:
                assert not present, f"acknowledged delete of {dtid} did not happen"
            counts["deletes"] += not present

        for rid in w.finished_runs:
            rec = s.runs.get(rid)
            assert rec is not None and rec["status"] == "aborted" and "finishedAt" in rec, rid
    return dict(counts)


def summarise(crew: List[Worker], windows: List[Tuple[float, float]]) -> Dict[str, int]:
    ops = [op for w in crew for op in w.ops]
    hit = [op for op in ops if op.error is not None]
    return {"operations": len(ops), "ok": len(ops) - len(hit), "connection_lost": len(hit),
            "during_faults": sum(overlaps(op, windows) for op in ops)}


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
def test_restarts_under_load(dialect: str, server: Any, make_database: Callable[..., peewee.Database],
                             pooled: bool) -> None:
    storage = make_storage(make_database, dialect, pooled)
    faults = [False, True, False]  # fast restart, crash restart, fast restart
    crew, windows = run_with_faults(storage, server, faults)

    ops = [op for w in crew for op in w.ops]
    for op in ops:
        if op.error is not None:
            assert isinstance(op.error, StorageError) and isinstance(op.error, peewee.OperationalError)
            # Only a call that was running while the server went away may fail.
            assert overlaps(op, windows), f"{op.name} started after the restart and failed: {op.error}"
    for w in crew:  # the storage recovered by itself on every worker's thread
        after = [op for op in w.ops if op.start > windows[-1][1]]
        assert after and all(op.error is None for op in after), f"{w.name} did not recover"

    counts = check_invariants(storage, crew)
    summary = summarise(crew, windows)
    assert counts["events"] > 0 and counts["messages"] > 0
    print(f"\nfaults {dialect} {'pooled' if pooled else 'plain'}: {len(faults)} restarts survived; "
          f"{summary}; data checked {counts}")


def test_transaction_is_never_retried(dialect: str, server: Any, database: peewee.Database) -> None:
    """A connection lost inside a transaction: ConnectionLostError, and none of it is applied."""
    create_tables(database)
    s = peewee_storage(database)
    s.set("memoryThreads", "before", thread("before"))
    with pytest.raises(ConnectionLostError) as caught:
        with s.transaction():
            s.set("memoryThreads", "a", thread("a"))
            server.restart()
            s.set("memoryThreads", "b", thread("b"))  # must not be retried on a new connection
    assert isinstance(caught.value, StorageError) and isinstance(caught.value, peewee.OperationalError)
    assert s.get("memoryThreads", "a") is None  # the next call works, and shows nothing of the transaction
    assert s.get("memoryThreads", "b") is None
    assert s.get("memoryThreads", "before") is not None

    # The same through the helpers' own transactions: a batch append and a thread delete.
    s.memory.messages.append("before", [{"role": "user", "content": str(k)} for k in range(50)])
    server.restart()
    s.memory.threads.delete("before")  # BEGIN on the dead connection: reconnects, then runs
    assert s.memory.threads.get("before") is None and s.memory.messages.list("before") == []


def test_server_down_then_back(dialect: str, server: Any,
                               make_database: Callable[..., peewee.Database]) -> None:
    """With the reconnect window off, while the server is down every call raises ConnectionLostError
    (no hang, no other error); once it is back, the very next call of every kind works."""
    storage = make_storage(make_database, dialect, pooled=False, reconnect_window=0)
    storage.memory.threads.set("t", thread("t"))
    storage.streams.open("r")
    calls: List[Tuple[str, Callable[[], Any]]] = [
        ("get", lambda: storage.get("memoryThreads", "t")),
        ("set", lambda: storage.set("memoryThreads", "t", thread("t", title="x"))),
        ("list", lambda: storage.list("memoryThreads")),
        ("append", lambda: storage.streams.append("r", {"type": "A"})),
        ("append_many", lambda: storage.streams.append_many("r", [{"type": "B"}] * 3)),
        ("messages.append", lambda: storage.memory.messages.append("t", [{"role": "user", "content": "c"}])),
        ("threads.delete", lambda: storage.memory.threads.delete("nope")),
        ("request_abort", lambda: storage.runs.request_abort("nope")),
    ]
    server._shutdown()  # the test servers' own stop-without-removing (tests/servers.py)
    try:
        for _name, call in calls:
            with pytest.raises(ConnectionLostError):
                call()
    finally:
        server._launch(server)
    for name, call in calls:
        if name == "request_abort":
            with pytest.raises(StorageError):  # NotFoundError: the call itself worked
                call()
        else:
            call()
    assert [e["seq"] for e in storage.streams.resume("r", timeout=0)] == [1, 2, 3, 4]


@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
def test_resume_follows_through_a_restart(dialect: str, server: Any,
                                          make_database: Callable[..., peewee.Database],
                                          pooled: bool) -> None:
    """A reader following a stream keeps following across a restart and gets every event once."""
    storage = make_storage(make_database, dialect, pooled)
    storage.streams.open("r")
    got: List[int] = []
    errors: List[BaseException] = []
    lost: List[ConnectionLostError] = []

    def follow() -> None:
        # The documented pattern: a poll that falls in the down time raises ConnectionLostError;
        # follow again from the last seq seen.
        last = 0
        while True:
            try:
                for event in storage.streams.resume("r", last, poll_interval=0.01, timeout=30):
                    got.append(event["seq"])
                    last = event["seq"]
                return
            except ConnectionLostError as exc:
                lost.append(exc)
                time.sleep(0.05)
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    for k in range(1, 61):
        storage.streams.append("r", {"type": "CUSTOM", "k": k})
        if k in (20, 40):
            server.restart(crash=k == 40)
        time.sleep(0.005)
    storage.streams.close("r")
    reader.join(30)
    assert not reader.is_alive()
    assert errors == [], errors
    assert got == list(range(1, 61))  # every event once, in order, across both restarts
    assert len(lost) <= 10


def test_a_tracked_run_through_a_server_outage(dialect: str, server: Any,
                                               make_database: Callable[..., peewee.Database]) -> None:
    """`storage.runs.track`: a restart between two events goes unnoticed by the block; a server that
    stays down fails the block with ConnectionLostError, its end cannot be written, and once the
    server is back `reap_stale` finds the run and ends its stream."""
    # Reconnect window off: the server that stays down fails the block at once instead of after it.
    storage = make_storage(make_database, dialect, pooled=False, reconnect_window=0)
    with storage.runs.track("survivor", "worker", thread_id="t") as run:
        run.emit({"type": "CUSTOM", "k": 1})
        server.restart()
        run.emit({"type": "CUSTOM", "k": 2})  # the storage reconnects by itself
    assert storage.runs.get("survivor")["status"] == "completed"
    assert [e["seq"] for e in storage.streams.resume("survivor", timeout=0)] == [1, 2, 3, 4]

    run = storage.runs.track("stranded", "worker").start()
    try:
        with pytest.raises(ConnectionLostError):
            with run:
                run.emit({"type": "CUSTOM", "k": 1})
                server._shutdown()  # and it stays down: the end cannot be written either
                run.emit({"type": "CUSTOM", "k": 2})
    finally:
        server._launch(server)
    assert storage.runs.get("stranded")["status"] == "running"
    assert reap_stale(storage, dt.timedelta(minutes=1), now_ms=now_ms() + 120_000) == 1
    assert [e["type"] for e in storage.streams.resume("stranded", timeout=0)] == ["RUN_STARTED", "CUSTOM",
                                                                                 "RUN_ERROR"]


def test_calls_wait_for_the_server_within_the_reconnect_window(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database]) -> None:
    """The default reconnect window: calls made while the server is down wait for it and succeed;
    a follower sees a delay, not an error."""
    storage = make_storage(make_database, dialect, pooled=False)
    storage.memory.threads.set("t", thread("t"))
    storage.streams.open("r")
    storage.runs.start("run", "agent")
    results: Dict[str, Any] = {}

    def calls() -> None:  # the calls run while the main thread brings the server back
        try:
            results["append"] = storage.streams.append("r", {"type": "A"})
            results["get"] = storage.get("memoryThreads", "t") is not None
            storage.memory.messages.append("t", [{"role": "user", "content": "c"}])
            results["append_many"] = storage.streams.append_many("r", [{"type": "B"}] * 3)
            results["abort"] = bool(storage.runs.request_abort("run"))
            storage.streams.close("r")
        except BaseException as exc:
            results["error"] = exc

    server._shutdown()
    worker = threading.Thread(target=calls)
    worker.start()
    time.sleep(1.0)
    server._launch(server)  # from the main thread: the test servers die with the thread that started them
    worker.join(60)
    assert "error" not in results, results.get("error")
    assert results == {"append": 1, "get": True, "append_many": [2, 3, 4], "abort": True}
    assert [e["seq"] for e in storage.streams.resume("r")] == [1, 2, 3, 4]
    assert len(storage.memory.messages.list("t")) == 1


def _lock_waits(server: Any) -> int:
    """Statements of other sessions waiting for a row lock right now."""
    conn = server.connect(admin=True)
    try:
        cur = conn.cursor()
        # MariaDB may wait for the row lock of a constant table while it plans the statement
        # (state "Statistics"), before InnoDB lists the transaction as waiting: on MariaDB count
        # the sessions running an INSERT (only the blocked append can be running one here).
        cur.execute("SELECT count(*) FROM pg_locks WHERE NOT granted" if server.dialect == "postgres" else
                    "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
                    " AND COMMAND = 'Query' AND INFO LIKE 'INSERT INTO%'")
        return int(cur.fetchone()[0])
    finally:
        conn.close()


def _start_behind_a_row_lock(server: Any, work: Callable[[], Any]
                             ) -> Tuple[threading.Thread, Dict[str, Any], Any]:
    """Run `work` on a thread while another session holds stream 'r''s row FOR UPDATE, and return
    once its statement has reached the server and waits there for that lock: the thread, its
    results ("value" or "error") and the holding connection, which the caller closes."""
    holder = server.connect()
    try:
        cur = holder.cursor()
        cur.execute("BEGIN")
        cur.execute("SELECT status FROM streams WHERE id = 'r' FOR UPDATE")
        results: Dict[str, Any] = {}

        def run() -> None:
            try:
                results["value"] = work()
            except BaseException as exc:
                results["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 30
        while not _lock_waits(server):
            assert worker.is_alive(), f"the statement ended before it waited for the lock: {results}"
            assert time.monotonic() < deadline, f"the statement never reached the server: {results}"
            time.sleep(0.01)
    except BaseException:
        holder.close()
        raise
    return worker, results, holder


def test_an_append_whose_reply_is_lost_for_good_says_it_may_be_stored(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database]) -> None:
    """The server goes away while an append is on it and stays away past the reconnect window:
    the append cannot read back what happened, so its ConnectionLostError says the event may
    have been stored (a caller that retried it blindly could store it twice)."""
    storage = make_storage(make_database, dialect, pooled=False, reconnect_window=0.5)
    storage.streams.open("r")
    worker, results, holder = _start_behind_a_row_lock(
        server, lambda: storage.streams.append("r", {"type": "A"}))
    down = False
    try:
        server._shutdown()
        down = True
        worker.join(60)
    finally:
        holder.close()
        if down:  # (launching a server that still runs would break it for the tests after this one)
            server._launch(server)
    error = results.get("error")
    assert isinstance(error, ConnectionLostError), results
    assert error.maybe_applied is True
    assert "may or may not" in str(error)


def test_a_message_batch_waits_for_the_server_instead_of_spinning(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database]) -> None:
    """A batch of messages too big for one INSERT, appended while the server is down: it waits
    for the server with the reconnect backoff (a few connection attempts), not in a busy loop
    of them, and then raises ConnectionLostError with nothing written."""
    storage = make_storage(make_database, dialect, pooled=False, reconnect_window=1.0)
    storage.memory.threads.set("t", thread("t"))
    database = storage.database
    attempts: List[int] = []
    connect = database._connect

    def counted_connect(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        return connect(*args, **kwargs)

    database._connect = counted_connect
    server._shutdown()
    try:
        with pytest.raises(ConnectionLostError):
            storage.memory.messages.append("t", [{"role": "user", "content": str(k)} for k in range(500)])
    finally:
        server._launch(server)
    assert 0 < len(attempts) <= 50, len(attempts)
    assert storage.memory.messages.list("t") == []


def test_a_tracked_run_waits_for_the_server_at_its_start_and_end(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database]) -> None:
    """The default reconnect window also covers `track`'s own transactions: a block entered
    while the server is down, and one that ends while it is down, wait for it instead of
    failing (a lost end would leave a completed run to be reaped as failed)."""
    storage = make_storage(make_database, dialect, pooled=False)
    results: Dict[str, Any] = {}
    inside, leave = threading.Event(), threading.Event()

    def enter_while_down() -> None:
        try:
            with storage.runs.track("entered", "worker", thread_id="t") as run:
                run.emit({"type": "CUSTOM"})
            results["entered"] = run.status
        except BaseException as exc:
            results["entered"] = exc

    def end_while_down() -> None:
        try:
            with storage.runs.track("ended", "worker", thread_id="t") as run:
                run.emit({"type": "CUSTOM"})
                inside.set()
                leave.wait(60)
            results["ended"] = run.status
        except BaseException as exc:
            results["ended"] = exc

    ender = threading.Thread(target=end_while_down)
    ender.start()
    assert inside.wait(60)
    server._shutdown()
    enterer = threading.Thread(target=enter_while_down)
    enterer.start()
    leave.set()
    time.sleep(1.0)  # both threads now wait for the server
    server._launch(server)  # from the main thread: the test servers die with the thread that started them
    ender.join(60)
    enterer.join(60)
    assert results == {"entered": "completed", "ended": "completed"}
    for run_id in ("entered", "ended"):
        assert storage.runs.get(run_id)["status"] == "completed"
        assert [e["type"] for e in storage.streams.resume(run_id, timeout=0)] == \
            ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]


def _shut_down_during_commit(server: Any) -> None:
    """Shut the PostgreSQL server down once a session's COMMIT runs (held by a deferred trigger)."""
    admin = server.connect(admin=True)
    try:
        cur = admin.cursor()
        deadline = time.monotonic() + 30
        while True:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'COMMIT' AND state = 'active'")
            if cur.fetchone()[0]:
                break
            assert time.monotonic() < deadline, "no session reached its COMMIT"
            time.sleep(0.01)
    finally:
        admin.close()
    server._shutdown()


@pytest.mark.parametrize("batch", ["events", "messages"])
@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_batch_whose_commit_is_lost_for_good_says_it_may_be_stored(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database], batch: str) -> None:
    """The server goes away during the COMMIT of an append_many or of a message batch too big
    for one INSERT, and stays away: the batch cannot be read back, so the error says it may
    have been stored (not that the server was merely unreachable). (A deferred trigger holds
    the COMMIT open: PostgreSQL's.)"""
    storage = make_storage(make_database, dialect, pooled=False, reconnect_window=0.5)
    storage.memory.threads.set("t", thread("t"))
    storage.streams.open("r")
    table = "stream_events" if batch == "events" else "messages"
    storage.execute("CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$")
    storage.execute(f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table} DEFERRABLE "
                    "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()")
    results: Dict[str, Any] = {}

    def append() -> None:
        try:
            if batch == "events":
                storage.streams.append_many("r", [{"type": "A"}] * 3)
            else:
                storage.memory.messages.append("t", [{"role": "user", "content": str(k)} for k in range(150)])
            results["stored"] = True
        except BaseException as exc:
            results["error"] = exc

    worker = threading.Thread(target=append)
    worker.start()
    try:
        _shut_down_during_commit(server)
        worker.join(60)
    finally:
        server._launch(server)
    error = results.get("error")
    assert isinstance(error, ConnectionLostError), results
    assert error.maybe_applied is True
    assert "may or may not" in str(error)


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_tracked_run_whose_end_commit_is_lost_reads_it_back(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database]) -> None:
    """The server restarts during the COMMIT of a block's end: the block reads the run back once
    the server answers and, finding it still running, writes the end again; the run is completed
    (not left running for reap_stale to fail). (A deferred trigger holds the first COMMIT open.)"""
    storage = make_storage(make_database, dialect, pooled=False)
    storage.execute("CREATE SEQUENCE slow_once")
    storage.execute("CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN IF nextval('slow_once') = 1 THEN PERFORM pg_sleep(60); END IF; "
                    "RETURN NULL; END $$")
    storage.execute("CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON agent_runs DEFERRABLE "
                    "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()")
    results: Dict[str, Any] = {}

    def work() -> None:
        try:
            with storage.runs.track("r", "worker", thread_id="t") as run:
                run.emit({"type": "CUSTOM"})
            results["status"] = run.status
        except BaseException as exc:
            results["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    try:
        _shut_down_during_commit(server)
    finally:
        server._launch(server)
    worker.join(60)
    assert results == {"status": "completed"}
    assert storage.runs.get("r")["status"] == "completed"
    assert [e["type"] for e in storage.streams.resume("r", timeout=0)] \
        == ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]


def test_a_block_that_raised_keeps_its_error_when_its_rollback_finds_the_server_gone(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database]) -> None:
    """A transaction block raises its own error after the server restarted under it: that error
    reaches the caller (the transaction is gone either way), and `retries` does not run the
    block again as if the connection loss had been what failed it."""
    storage = make_storage(make_database, dialect, pooled=False)
    calls: List[int] = []

    @storage.transaction(retries=2)
    def block() -> None:
        calls.append(1)
        storage.memory.threads.set("t", thread("t"))
        server.restart()
        raise ValueError("the block's own error")

    with pytest.raises(ValueError, match="own error"):
        block()
    assert calls == [1]
    assert storage.memory.threads.get("t") is None


@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
def test_a_thousand_followers_ride_through_restarts(dialect: str, server: Any,
                                                    make_database: Callable[..., peewee.Database],
                                                    pooled: bool) -> None:
    """1,000 followers share the poller's connection; when the server restarts (fast, then crash)
    the poller reconnects and every follower still gets every event once, in order."""
    storage = make_storage(make_database, dialect, pooled)
    runs = [f"r{k}" for k in range(20)]
    for run_id in runs:
        storage.streams.open(run_id)
    got: Dict[Tuple[str, int], List[int]] = {}
    reasons: List[Optional[str]] = []
    errors: List[BaseException] = []
    started = threading.Semaphore(0)

    def follow(run_id: str, k: int) -> None:
        seqs = got[(run_id, k)] = []
        try:
            follower = storage.streams.resume(run_id, poll_interval=0.01, timeout=300)
            started.release()
            for event in follower:
                seqs.append(event["seq"])
            reasons.append(follower.reason)
        except BaseException as exc:
            errors.append(exc)
            started.release()

    old = threading.stack_size(256 * 1024)
    try:
        readers = [threading.Thread(target=follow, args=(run_id, k), daemon=True)
                   for run_id in runs for k in range(50)]
        for t in readers:
            t.start()
    finally:
        threading.stack_size(old)
    for _ in readers:
        started.acquire(timeout=120)
    assert errors == []

    def append_round(k: int) -> None:
        for run_id in runs:
            for _attempt in range(100):  # an append that falls in the down time is tried again
                try:
                    storage.streams.append(run_id, {"type": "CUSTOM", "k": k})
                    break
                except ConnectionLostError:
                    time.sleep(0.1)
            else:
                raise AssertionError("the server did not come back")

    for k, crash in ((0, None), (1, False), (2, True), (3, None)):
        append_round(k)
        if crash is not None:
            server.restart(crash=crash)
    for run_id in runs:
        storage.streams.close(run_id)
    for t in readers:
        t.join(120)
    assert not any(t.is_alive() for t in readers)
    assert errors == []
    want = {run_id: [e["seq"] for e in storage.streams.resume(run_id, timeout=0)] for run_id in runs}
    assert all(len(seqs) == 4 for seqs in want.values())
    assert all(seqs == want[run_id] for (run_id, _), seqs in got.items())
    assert reasons == ["closed"] * len(readers)


@pytest.mark.parametrize("idempotent", [None, True], ids=["default", "idempotent"])
def test_a_raw_write_cut_off_by_a_restart_is_run_again_only_when_said_to_be_idempotent(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database],
        idempotent: Optional[bool]) -> None:
    """`storage.execute` of the caller's own INSERT, in flight (waiting for a row lock) when the
    server goes down and comes back within the reconnect window: by default it is not run again
    (it might have been applied; the error says so and nothing is written twice); with
    `idempotent=True` it is run again once the server is back."""
    storage = make_storage(make_database, dialect, pooled=False, reconnect_window=30)
    storage.streams.open("r")
    storage.execute("CREATE TABLE scratch (note VARCHAR(20))")
    share = "FOR SHARE" if dialect == "postgres" else "LOCK IN SHARE MODE"
    insert = f"INSERT INTO scratch (note) SELECT 'written' FROM streams WHERE id = 'r' {share}"
    options = {} if idempotent is None else {"idempotent": idempotent}
    worker, results, holder = _start_behind_a_row_lock(server, lambda: storage.execute(insert, **options))
    down = False
    try:
        server._shutdown()
        down = True
    finally:
        holder.close()
        if down:
            server._launch(server)
    worker.join(60)
    assert not worker.is_alive()
    rows = storage.execute("SELECT count(*) FROM scratch", idempotent=True).fetchone()[0]
    if idempotent:
        assert "error" not in results and rows == 1, results
    else:
        error = results.get("error")
        assert isinstance(error, ConnectionLostError), results
        assert error.maybe_applied is True
        assert rows == 0


def test_a_fork_does_not_wait_for_a_poller_riding_out_an_outage(
        dialect: str, server: Any, make_database: Callable[..., peewee.Database],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the server is away, the stream poller waits out its reconnect window inside its
    round. A fork() meanwhile (a pre-forking server starting a worker; subprocess with a
    preexec_fn) does not wait for it: only SQLite's pollers hold forks off, for the length of
    one statement (nothing of a network driver stays locked in the child)."""
    monkeypatch.setattr(forkguard, "FORK_WAIT", 3.0)
    storage = make_storage(make_database, dialect, pooled=False)
    storage.streams.open("r")
    seen: List[int] = []
    reader = threading.Thread(target=lambda: seen.extend(e["seq"] for e in storage.streams.resume(
        "r", poll_interval=0.05, timeout=60)))
    reader.start()
    caplog.set_level(logging.WARNING)
    down = False
    try:
        storage.streams.append("r", {"type": "A"})
        deadline = time.monotonic() + 30
        while not seen:
            assert time.monotonic() < deadline, "the follower never got the first event"
            time.sleep(0.01)
        server._shutdown()
        down = True
        while not any(r.threadName == "better-agent-poller" and "reconnecting" in r.getMessage()
                      for r in caplog.records):  # the poller is inside its round, waiting
            assert time.monotonic() < deadline, "the poller never noticed the outage"
            time.sleep(0.01)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        if down:
            server._launch(server)
    stalled = [r.getMessage() for r in caplog.records if "stayed inside a statement" in r.getMessage()]
    assert not stalled, stalled
    storage.streams.append("r", {"type": "B"})
    storage.streams.close("r")
    reader.join(60)
    assert not reader.is_alive() and seen == [1, 2]


def test_an_append_after_the_server_hung_up_does_not_take_an_identical_event_for_its_own(
        dialect: str, make_database: Callable[..., peewee.Database]) -> None:
    """The server ends an idle connection (restart, failover, idle timeout); meanwhile another
    writer appends an event with the same body. The next append on the dead connection finds
    the hang-up before sending (and reconnects), so it stores its own event rather than reading
    the other writer's back as its own."""
    db = make_database()
    create_tables(db)
    mine, theirs = peewee_storage(db), peewee_storage(make_database())
    mine.streams.open("r")
    assert mine.streams.append("r", {"type": "PING"}) == 1
    admin = make_database()
    if dialect == "postgres":
        pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        admin.execute_sql("SELECT pg_terminate_backend(%s)", (pid,))
    else:
        admin.execute_sql(f"KILL CONNECTION {int(db.connection().thread_id())}")
    admin.close()
    deadline = time.monotonic() + 10
    while not mine.dialect.hung_up(db.connection()):  # the end of the session has reached the socket
        assert time.monotonic() < deadline, "the server never closed the connection"
        time.sleep(0.01)
    assert theirs.streams.append("r", {"type": "PING"}) == 2
    assert mine.streams.append("r", {"type": "PING"}) == 3
    assert [e["seq"] for e in theirs.streams.resume("r", timeout=0)] == [1, 2, 3]
