"""What our performance indexes cost the writes: W1, W4 and W6 with and without them, A/B.

    python -m bench.index_cost --dialect all [--rows 50000] [--rounds 9]

Two databases of one dialect (two SQLite files; two databases on one throwaway server),
filled alike (bench.growth's data), one with our indexes and one with the shared schema's
alone. The writes alternate between them round by round (A B, B A, ...), so the machine's
other load hits both alike: W1 `set` of a run (a new id, then the same id again: start and
end), W4 `memory.messages.append` of 10, W6 `streams.append` of one event. Prints the
median cost per operation of each side and their ratio. Not a test: nothing asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import peewee

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.schema import drop_performance_indexes

from .growth import Growth

DIALECTS = ("sqlite", "postgres", "mysql")


@contextlib.contextmanager
def two_databases(dialect: str) -> Iterator[Tuple[peewee.Database, peewee.Database]]:
    """Two empty databases of `dialect` (servers started here are stopped on the way out)."""
    if dialect == "sqlite":
        directory = tempfile.mkdtemp(prefix="bap-index-cost-")
        try:
            yield (peewee.SqliteDatabase(os.path.join(directory, "with.db"), pragmas={"journal_mode": "wal"}),
                   peewee.SqliteDatabase(os.path.join(directory, "without.db"),
                                         pragmas={"journal_mode": "wal"}))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    from tests.servers import start_mariadb, start_postgres

    server = (start_postgres if dialect == "postgres" else start_mariadb)()
    try:
        made = []
        for name in ("bap_with", "bap_without"):
            kwargs = server.create_database(name).connect_kwargs()
            database = kwargs.pop("database")
            cls = peewee.PostgresqlDatabase if dialect == "postgres" else peewee.MySQLDatabase
            made.append(cls(database, **kwargs))
        yield made[0], made[1]
        for db in made:
            db.close()
    finally:
        server.stop()


def writes(storage: Any, tag: str) -> Dict[str, Callable[[], None]]:
    """One W1, W4 and W6 operation each, on fresh ids."""
    counter = itertools.count()
    storage.memory.threads.set(f"w4-{tag}", {"id": f"w4-{tag}", "agentName": "agent-1", "createdAt": 1,
                                             "updatedAt": 1})
    storage.runs.start(f"w6-{tag}", "agent-1")
    storage.streams.open(f"w6-{tag}")
    now = int(time.time() * 1000)

    def w1() -> None:
        run_id = f"w1-{tag}-{next(counter)}"
        record = {"runId": run_id, "agentName": "agent-2", "threadId": f"thread-{next(counter) % 9999:07d}",
                  "status": "running", "config": {"model": "m"}, "startedAt": now, "updatedAt": now}
        storage.set("runs", run_id, record)
        record.update(status="completed", finalEvent={"type": "RUN_FINISHED"}, updatedAt=now + 9,
                      finishedAt=now + 9)
        storage.set("runs", run_id, record)

    def w4() -> None:
        storage.memory.messages.append(f"w4-{tag}", [{"id": f"m{i}", "role": "user", "content": "hello"}
                                                     for i in range(10)], run_id=f"w4run-{next(counter)}")

    def w6() -> None:
        storage.streams.append(f"w6-{tag}", {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x"})

    return {"W1 set a run (new id, then same id)": w1, "W4 messages.append 10": w4, "W6 streams.append 1": w6}


def measure(dialect: str, rows: int, rounds: int, ops: int) -> Dict[str, Dict[str, float]]:
    """Median µs per operation with and without our indexes, per workload."""
    with two_databases(dialect) as (with_db, without_db):
        sides = {}
        for label, db in (("with", with_db), ("without", without_db)):
            create_tables(db)
            storage = peewee_storage(db)
            Growth(storage, dialect, log=lambda message: None).grow(rows)
            if label == "without":
                drop_performance_indexes(db)
            Growth(storage, dialect, log=lambda message: None).analyze()
            sides[label] = writes(storage, label)
        out: Dict[str, Dict[str, float]] = {}
        for name in sides["with"]:
            times: Dict[str, List[float]] = {"with": [], "without": []}
            for label in ("with", "without"):
                for _ in range(3):
                    sides[label][name]()
            for r in range(rounds):
                for label in (("with", "without") if r % 2 == 0 else ("without", "with")):
                    call = sides[label][name]
                    t0 = time.perf_counter()
                    for _ in range(ops):
                        call()
                    times[label].append((time.perf_counter() - t0) / ops * 1e6)
            w, wo = statistics.median(times["with"]), statistics.median(times["without"])
            ratios = statistics.median(a / b for a, b in zip(times["with"], times["without"]))
            out[name] = {"with_us": w, "without_us": wo, "ratio": ratios}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.index_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS + ("all",), default="sqlite")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ops", type=int, default=100)
    args = parser.parse_args(argv)
    print("| dialect | write | without our indexes | with | ratio (median of rounds) |")
    print("|---|---|---:|---:|---:|")
    for dialect in DIALECTS if args.dialect == "all" else (args.dialect,):
        for name, r in measure(dialect, args.rows, args.rounds, args.ops).items():
            print(f"| {dialect} | {name} | {r['without_us']:.0f} µs | {r['with_us']:.0f} µs "
                  f"| {r['ratio']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
