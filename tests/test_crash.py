"""Crash safety: a writer process killed with SIGKILL in the middle of a
large `append_many` or of `threads.delete` (a thread with many messages).

The writer prints "begin X" before and "acked X" after each operation. The test lets one
operation finish (to learn how long one takes), then kills the writer half way through
the next one, from outside, with SIGKILL: no Python cleanup, no rollback by the client.
Afterwards every operation is all-or-nothing (an event batch fully stored with
consecutive seqs or not at all; a thread with all its messages or gone with all of
them), every acknowledged operation is there, the database keeps working, and on
SQLite `PRAGMA integrity_check` says ok (and `foreign_key_check` finds nothing).
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import peewee
import pytest

from better_agent_peewee import create_tables, peewee_storage
from tests.samples import thread

REPO = Path(__file__).resolve().parent.parent
BATCH = 10_000  # events per append_many
MESSAGES = 8_000  # messages per doomed thread
ROUNDS = 2  # kills per test; more (up to MAX_ROUNDS) until one lands in the middle of an operation
MAX_ROUNDS = 6
STREAM = "crash-stream"

DIALECTS = [pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
            pytest.param("postgres", marks=pytest.mark.postgres, id="postgres")]


def writer_main(url: str, mode: str, names: str) -> None:
    """The writer process: `append_many` batches forever, or delete the named threads in turn."""
    from playhouse.db_url import connect

    storage = peewee_storage(connect(url))
    storage.get("memoryThreads", "warm-up")  # connect now, so the first timing is the operation's own
    if mode == "append_many":
        n = 0
        while True:
            n += 1
            batch = f"{names}-{n}"
            print("begin", batch, flush=True)
            began = time.monotonic()
            storage.streams.append_many(STREAM,
                                        [{"type": "CUSTOM", "b": batch, "k": k} for k in range(BATCH)])
            print("acked", batch, time.monotonic() - began, flush=True)
    for tid in names.split(","):
        print("begin", tid, flush=True)
        began = time.monotonic()
        storage.memory.threads.delete(tid)
        print("acked", tid, time.monotonic() - began, flush=True)
    time.sleep(120)  # wait to be killed


def kill_in_the_middle(url: str, mode: str, names: str) -> Tuple[List[str], Optional[str]]:
    """Run a writer; SIGKILL it half way through its second operation.

    Returns the acknowledged operations and the one that was killed before it was
    acknowledged (None if it finished first after all).
    """
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from tests.test_crash import writer_main; "
                             "writer_main(sys.argv[1], sys.argv[2], sys.argv[3])", url, mode, names],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    acked: List[str] = []
    took: List[float] = []
    inflight = None
    try:
        assert proc.stdout is not None
        while inflight is None:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the writer ended early: {proc.stdout.read()}")
            kind, name, *rest = line.split()
            if kind == "acked":
                acked.append(name)
                took.append(float(rest[0]))
            elif kind == "begin" and took:
                time.sleep(min(took) / 3)
                proc.kill()  # SIGKILL
                inflight = name
            elif kind != "begin":
                raise AssertionError(f"unexpected writer output: {line}{proc.stdout.read()}")
    finally:
        proc.kill()
        rest_out = proc.communicate(timeout=30)[0]
    assert proc.returncode == -9
    if f"acked {inflight} " in rest_out:  # it finished between our sleep and the signal
        acked.append(inflight)
        inflight = None
    return acked, inflight


def integrity(database: peewee.Database, dialect: str) -> None:
    if dialect == "sqlite":
        assert database.execute_sql("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert database.execute_sql("PRAGMA foreign_key_check").fetchall() == []


@pytest.mark.parametrize("dialect", DIALECTS)
def test_killed_during_append_many(dialect: str, database: peewee.Database, database_url: str) -> None:
    create_tables(database)
    storage = peewee_storage(database)
    storage.streams.open(STREAM)
    database.close()
    acked: List[str] = []
    killed: List[str] = []
    round_ = 0
    while round_ < ROUNDS or (not killed and round_ < MAX_ROUNDS):
        done, inflight = kill_in_the_middle(database_url, "append_many", f"r{round_}")
        acked += done
        killed += [inflight] if inflight else []
        round_ += 1
    assert killed, "no writer was killed in the middle of an append_many"

    integrity(database, dialect)
    rows = storage.list("streamEvents", {"where": {"runId": STREAM}, "orderBy": {"seq": "asc"}})["items"]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), "seqs are not exactly 1..N"
    batches: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
    for r in rows:
        batches[r["event"]["b"]].append((r["event"]["k"], r["seq"]))
    for batch, items in batches.items():
        assert len(items) == BATCH, f"batch {batch} half-written: {len(items)} of {BATCH}"
        ks, seqs = zip(*items)
        assert list(ks) == list(range(BATCH)) and list(seqs) == list(range(seqs[0], seqs[0] + BATCH))
    assert set(acked) <= set(batches), "an acknowledged batch is missing"
    assert set(batches) <= set(acked) | set(killed)
    # The database keeps working: the next append continues the numbering.
    assert storage.streams.append(STREAM, {"type": "AFTER"}) == len(rows) + 1
    integrity(database, dialect)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_killed_during_thread_delete(dialect: str, database: peewee.Database, database_url: str) -> None:
    create_tables(database)
    storage = peewee_storage(database)
    storage.memory.threads.set("bystander", thread("bystander"))
    storage.memory.messages.append("bystander", [{"role": "user", "content": "stay"}] * 10)
    names: List[List[str]] = []
    acked: List[str] = []
    killed: List[str] = []
    while len(names) < ROUNDS or (not killed and len(names) < MAX_ROUNDS):
        pair = [f"doomed-{len(names)}-{k}" for k in range(2)]
        for tid in pair:
            storage.memory.threads.set(tid, thread(tid))
            storage.memory.messages.append(tid, [{"role": "user", "content": f"{tid} {k}"}
                                                 for k in range(MESSAGES)])
        database.close()
        names.append(pair)
        done, inflight = kill_in_the_middle(database_url, "delete", ",".join(pair))
        acked += done
        killed += [inflight] if inflight else []
    assert killed, "no writer was killed in the middle of a thread delete"

    integrity(database, dialect)
    for tid in (t for pair in names for t in pair):
        present = storage.memory.threads.get(tid) is not None
        count = len(storage.memory.messages.list(tid))
        assert (present, count) in ((True, MESSAGES), (False, 0)), \
            f"{tid} half deleted: thread {'present' if present else 'gone'}, {count} messages"
        if tid in acked:
            assert not present, f"acknowledged delete of {tid} did not happen"
        if tid not in acked and tid not in killed:
            assert present
    assert len(storage.memory.messages.list("bystander")) == 10
    # The database keeps working: a killed delete can simply be run again.
    for tid in killed:
        storage.memory.threads.delete(tid)
        assert storage.memory.threads.get(tid) is None and storage.memory.messages.list(tid) == []
    integrity(database, dialect)
