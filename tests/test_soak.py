"""Concurrency soak: many writers and readers on one database at once.

Part 1: 16 threads share ONE storage object and run a mixed workload for a bounded time
(thread and message writes, run start / abort / finish, an abort race, stream appends
and batch appends to shared streams, stream reads, list queries, thread deletes),
while one follower per shared stream reads it with `resume`.
Part 2: the same workload from 4 processes sharing one database (SQLite file,
PostgreSQL, MariaDB), each process building its own peewee database from the URL.

Afterwards the invariants must hold:
* every stream's seqs are exactly 1..N, each acknowledged event sits at the seq it was
  given, no event is stored twice, and every follower saw every event once, in order;
* every acknowledged write reads back (thread titles, message batches, finished runs);
* every thread's messages come back in order (each batch in its own order);
* an abort race has exactly one winner;
* no error escaped at all (in particular no "database is locked" on SQLite).

Duration: ``BAP_SOAK_SECONDS`` per part and dialect (default 2 s, for CI); run longer
locally, e.g. ``BAP_SOAK_SECONDS=60``. The operation counts are printed.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import peewee
import pytest

from better_agent_peewee import create_tables, peewee_storage
from tests.samples import thread

SECONDS = float(os.environ.get("BAP_SOAK_SECONDS", "2"))
THREADS = 16
PROCESSES = 4
STREAMS = 3  # shared streams every worker appends to
RACES = 4  # shared running runs every worker tries to abort
REPO = Path(__file__).resolve().parent.parent


def stream_id(k: int) -> str:
    return f"soak-stream-{k}"


def race_id(k: int) -> str:
    return f"soak-race-{k}"


def prepare(storage: Any) -> None:
    """The shared streams and the runs to race for."""
    for k in range(STREAMS):
        storage.streams.open(stream_id(k))
    for k in range(RACES):
        storage.runs.start(race_id(k), "racer")


# -- the workload (runs in a thread or in a process) ----------------------------------------------


def work(storage: Any, name: str, seconds: float, seed: int) -> Dict[str, Any]:
    """Run the mixed workload as worker `name` for `seconds`; return its ledger (JSON-able)."""
    s = storage
    rng = random.Random(seed)
    ops: Counter = Counter()
    errors: List[str] = []
    tid = f"{name}-thread"
    ledger: Dict[str, Any] = {
        "name": name, "thread": tid, "title": None, "batches": [], "events": [], "runs": {},
        "races": defaultdict(int), "deleted": [], "ops": ops, "errors": errors, "slowest": ["", 0.0],
    }
    s.memory.threads.set(tid, thread(tid, agentName="soak"))
    counter = 0

    def op_thread_set() -> None:
        title = f"title {counter}"
        s.memory.threads.set(tid,
                             thread(tid, agentName="soak", title=title,
                                    updatedAt=1_700_000_000_000 + counter))
        ledger["title"] = title

    def op_messages_append() -> None:
        batch = f"{name}-b{counter}"
        size = rng.randint(1, 4)
        s.memory.messages.append(tid, [{"id": f"{batch}-{k}", "role": "user", "content": batch, "k": k}
                                       for k in range(size)])
        ledger["batches"].append([batch, size])

    def op_messages_list() -> None:
        got = s.memory.messages.list(tid, limit=rng.choice([None, 3, 10]))
        assert [m["createdAt"] for m in got] == sorted(m["createdAt"] for m in got), "messages out of order"
        by_batch: Dict[str, List[int]] = defaultdict(list)
        for m in got:
            by_batch[m["content"]].append(m["k"])
        for ks in by_batch.values():
            assert ks == sorted(ks), "a batch's messages out of order"

    def op_run_cycle() -> None:
        rid = f"{name}-run-{counter}"
        s.runs.start(rid, name, thread_id=tid, config={"n": counter})
        aborted = rng.random() < 0.5
        if aborted:
            assert s.runs.request_abort(rid) == "requested", "nobody else asked, yet the abort was refused"
        assert s.runs.abort_requested(rid) == aborted
        if aborted:
            s.runs.finish(rid, "aborted", {"type": "RUN_ERROR", "message": "stop"})
        else:
            s.runs.finish(rid, "completed", {"type": "RUN_FINISHED"})
        ledger["runs"][rid] = "aborted" if aborted else "completed"

    def op_abort_race() -> None:
        rid = race_id(rng.randrange(RACES))
        if s.runs.request_abort(rid):
            ledger["races"][rid] += 1

    def op_append() -> None:
        sid = stream_id(rng.randrange(STREAMS))
        payload = f"{name}-e{counter}"
        seq = s.streams.append(sid, {"type": "CUSTOM", "p": payload})
        ledger["events"].append([sid, payload, seq])

    def op_append_many() -> None:
        sid = stream_id(rng.randrange(STREAMS))
        payloads = [f"{name}-e{counter}-{k}" for k in range(rng.randint(2, 5))]
        seqs = s.streams.append_many(sid, [{"type": "CUSTOM", "p": p} for p in payloads])
        assert seqs == list(range(seqs[0], seqs[0] + len(payloads))), "batch seqs not consecutive"
        ledger["events"].extend([sid, p, q] for p, q in zip(payloads, seqs))

    def op_resume_read() -> None:
        sid = stream_id(rng.randrange(STREAMS))
        after = rng.randrange(0, 50)
        seqs = [e["seq"] for e in s.streams.resume(sid, after, timeout=0)]
        assert seqs == list(range(after + 1, after + 1 + len(seqs))), "resume skipped or repeated a seq"

    def op_list_runs() -> None:
        items = s.list("runs",
                       {"where": {"agentName": name}, "orderBy": {"startedAt": "desc"}, "take": 5})["items"]
        started = [r["startedAt"] for r in items]
        assert started == sorted(started, reverse=True) and len(items) <= 5
        assert all(r["agentName"] == name for r in items)

    def op_list_threads() -> None:
        items = s.memory.threads.list(agent_name="soak", limit=8)
        updated = [t["updatedAt"] for t in items]
        assert updated == sorted(updated, reverse=True)

    def op_temp_thread() -> None:
        temp = f"{name}-temp-{counter}"
        s.memory.threads.set(temp, thread(temp, agentName="temp"))
        s.memory.messages.append(temp, [{"role": "user", "content": str(k)} for k in range(5)])
        s.memory.threads.delete(temp)
        ledger["deleted"].append(temp)

    def op_get() -> None:
        got = s.get("memoryThreads", tid)
        assert got is not None and got["id"] == tid

    menu = [(op_thread_set, 2), (op_messages_append, 3), (op_messages_list, 2), (op_run_cycle, 2),
            (op_abort_race, 1), (op_append, 4), (op_append_many, 2), (op_resume_read, 1), (op_list_runs, 1),
            (op_list_threads, 1), (op_temp_thread, 1), (op_get, 2)]
    choices = [fn for fn, weight in menu for _ in range(weight)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(errors) < 5:
        counter += 1
        fn = rng.choice(choices)
        began = time.monotonic()
        try:
            fn()
            ops[fn.__name__[3:]] += 1
            took = time.monotonic() - began
            if took > ledger["slowest"][1]:
                ledger["slowest"] = [fn.__name__[3:], took]
        except Exception:
            errors.append(f"{fn.__name__}: {traceback.format_exc()}")
    ledger["races"] = dict(ledger["races"])
    return ledger


def process_main(url: str, name: str, seconds: float, seed: int, out: str) -> None:
    """Entry point of a soak process: its own peewee database from `url`, then the workload."""
    from playhouse.db_url import connect

    db = connect(url)
    try:
        ledger = work(peewee_storage(db), name, seconds, seed)
    except Exception:
        ledger = {"name": name, "errors": [traceback.format_exc()], "ops": {}}
    Path(out).write_text(json.dumps(ledger))
    db.close()


# -- followers and checks -------------------------------------------------------------------------


class Follower(threading.Thread):
    """Follows one shared stream with `resume` until it is closed."""

    def __init__(self, storage: Any, sid: str) -> None:
        super().__init__(name=f"follow-{sid}", daemon=True)
        self.storage, self.sid = storage, sid
        self.seen: List[Any] = []
        self.error: Optional[str] = None

    def run(self) -> None:
        try:
            for e in self.storage.streams.resume(self.sid, poll_interval=0.005, timeout=SECONDS * 10 + 60):
                self.seen.append((e["seq"], e["p"]))
        except Exception:
            self.error = traceback.format_exc()


def check(storage: Any, ledgers: List[Dict[str, Any]], followers: List[Follower]) -> Dict[str, int]:
    s = storage
    errors = [e for ledger in ledgers for e in ledger["errors"]]
    assert not errors, f"{len(errors)} errors escaped, first:\n{errors[0]}"
    assert not any("database is locked" in e for e in errors)

    # Streams: seqs 1..N, each acknowledged event at its seq, nothing twice, followers saw it all.
    acked: Dict[str, Dict[int, str]] = defaultdict(dict)
    for ledger in ledgers:
        for sid, payload, seq in ledger["events"]:
            assert seq not in acked[sid], f"{sid}: seq {seq} acknowledged twice"
            acked[sid][seq] = payload
    total_events = 0
    for k in range(STREAMS):
        sid = stream_id(k)
        rows = s.list("streamEvents", {"where": {"runId": sid}, "orderBy": {"seq": "asc"}})["items"]
        seqs = [r["seq"] for r in rows]
        assert seqs == list(range(1, len(rows) + 1)), f"{sid}: seqs are not exactly 1..N"
        stored = {r["seq"]: r["event"]["p"] for r in rows}
        assert stored == acked[sid], f"{sid}: stored events differ from the acknowledged ones"
        total_events += len(rows)
    for f in followers:
        assert f.error is None, f.error
        assert not f.is_alive(), f"{f.name} did not end when its stream closed"
        expected = sorted(acked[f.sid].items())
        assert f.seen == expected, \
            f"{f.sid}: the follower saw {len(f.seen)} events, {len(expected)} were stored"

    # Threads and messages: acknowledged writes read back, in order.
    total_messages = 0
    for ledger in ledgers:
        t = s.memory.threads.get(ledger["thread"])
        assert t is not None
        if ledger["title"] is not None:
            assert t["title"] == ledger["title"]
        msgs = s.memory.messages.list(ledger["thread"])
        by_batch: Dict[str, List[int]] = defaultdict(list)
        for m in msgs:
            by_batch[m["content"]].append(m["k"])
        assert sorted(by_batch) == sorted(b for b, _ in ledger["batches"]), \
            f"{ledger['name']}: batches differ"
        for batch, size in ledger["batches"]:
            assert by_batch[batch] == list(range(size)), f"batch {batch} out of order or incomplete"
        created = [m["createdAt"] for m in msgs]
        assert created == sorted(created)
        total_messages += len(msgs)
        for temp in ledger["deleted"]:
            assert s.memory.threads.get(temp) is None and s.memory.messages.list(temp) == []
        for rid, status in ledger["runs"].items():
            rec = s.runs.get(rid)
            assert rec is not None and rec["status"] == status and "finishedAt" in rec, rid
            assert ("abortRequestedAt" in rec) == (status == "aborted")

    # The abort race: exactly one winner per raced run.
    wins: Counter = Counter()
    for ledger in ledgers:
        wins.update(ledger["races"])
    for k in range(RACES):
        rid = race_id(k)
        asked = s.runs.get(rid).get("abortRequestedAt") is not None
        assert wins[rid] == (1 if asked else 0), f"{rid}: {wins[rid]} callers won the abort race"
    return {"events": total_events, "messages": total_messages}


def report(capsys: pytest.CaptureFixture, what: str, ledgers: List[Dict[str, Any]], seconds: float,
           data: Dict[str, int]) -> None:
    ops: Counter = Counter()
    for ledger in ledgers:
        ops.update(ledger["ops"])
    total = sum(ops.values())
    slowest = max((ledger["slowest"] for ledger in ledgers), key=lambda x: x[1])
    with capsys.disabled():
        print(f"\nsoak {what}: {total} operations in {seconds:.1f}s ({total / seconds:.0f}/s), "
              f"{data['events']} events, {data['messages']} messages, slowest {slowest[0]} "
              f"{slowest[1] * 1000:.0f} ms; {dict(sorted(ops.items()))}")
    assert total > 0


# -- the tests ------------------------------------------------------------------------------------


def test_soak_threads(dialect: str, database: peewee.Database, capsys: pytest.CaptureFixture) -> None:
    """16 threads on one storage object."""
    create_tables(database)
    storage = peewee_storage(database)
    prepare(storage)
    followers = [Follower(storage, stream_id(k)) for k in range(STREAMS)]
    for f in followers:
        f.start()
    ledgers: List[Dict[str, Any]] = [{} for _ in range(THREADS)]

    def run(n: int) -> None:
        ledgers[n] = work(storage, f"t{n}", SECONDS, seed=n)

    workers = [threading.Thread(target=run, args=(n,), name=f"soak-{n}") for n in range(THREADS)]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(SECONDS + 120)
    elapsed = time.monotonic() - start
    assert not any(w.is_alive() for w in workers), "a soak thread hangs"
    for k in range(STREAMS):
        storage.streams.close(stream_id(k))
    for f in followers:
        f.join(30)
    data = check(storage, ledgers, followers)
    report(capsys, f"{dialect} {THREADS} threads", ledgers, elapsed, data)


@pytest.mark.parametrize("dialect", [pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
                                     pytest.param("postgres", marks=pytest.mark.postgres, id="postgres")])
def test_soak_processes(dialect: str, database_url: str, database: peewee.Database, tmp_path: Path,
                        capsys: pytest.CaptureFixture) -> None:
    """4 processes on one database, each with its own peewee database built from the URL."""
    create_tables(database)
    storage = peewee_storage(database)
    prepare(storage)
    database.close()  # the parent only follows and checks from here on
    followers = [Follower(storage, stream_id(k)) for k in range(STREAMS)]
    for f in followers:
        f.start()
    outs = [tmp_path / f"ledger-{n}.json" for n in range(PROCESSES)]
    procs = [subprocess.Popen([sys.executable, "-c",
                               "import sys; from tests.test_soak import process_main; "
                               "process_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), "
                               "sys.argv[5])",
                               database_url, f"p{n}", str(SECONDS), str(100 + n), str(outs[n])],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for n in range(PROCESSES)]
    start = time.monotonic()
    outputs = [p.communicate(timeout=SECONDS + 120)[0].decode(errors="replace") for p in procs]
    elapsed = time.monotonic() - start
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"soak process failed:\n{out[-3000:]}"
    ledgers = [json.loads(o.read_text()) for o in outs]
    for k in range(STREAMS):
        storage.streams.close(stream_id(k))
    for f in followers:
        f.join(30)
    data = check(storage, ledgers, followers)
    report(capsys, f"{dialect} {PROCESSES} processes", ledgers, elapsed, data)
