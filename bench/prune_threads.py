"""Memory retention at scale: what `memory.prune_threads` costs next to the messages a database keeps.

    nice -n 19 python -m bench.prune_threads --dialect sqlite --lock /tmp/bench.lock --timed-priority 0
    nice -n 19 python -m bench.prune_threads --dialect postgres --explain ...
    python -m bench.prune_threads --dialect mysql --kept 4000 --small 1000 --idle 20 --messages 5 --quick

Two databases of the same shape side by side (two SQLite files, or two databases of one
throwaway server): a big one keeping `--kept` messages (default 1,000,000) and a small one
keeping `--small` (default 10,000), in threads of `--messages` messages (default 100) updated
within the last week; one kept thread in a hundred is idle but has a running run (it must
stay). Each round adds `--idle` threads (default 10,000) of `--messages` messages, not updated
for sixty days, to both (outside the timing, then checkpointed and ANALYZEd), and times
``prune_threads(timedelta(days=30))`` on each, interleaved; every idle thread and message must
go, and every kept one stay (checked, or the benchmark fails). The two sides' prunes run in
turn, in the other order each round, and each is followed, untimed, by what the server does
afterwards (PostgreSQL: VACUUM ANALYZE; InnoDB: its purge, waited for). A prune with nothing
idle is timed too. Big / small is the figure: a prune should cost what it deletes, not what the
database keeps, so it should stay near 1 (the issue's bound: 1.5).

Only the timed parts hold ``--lock`` and, with ``--timed-priority``, run at that priority (as
`bench.prune_kept`, whose loading and timing helpers this uses). Not a test: nothing here
asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from better_agent_peewee import create_tables, open_database, peewee_storage

from .env import machine, write_results
from .growth import recorded
from .prune_kept import DIALECTS, Timing, fast_load
from .quiet import load1

DAY = 86_400_000
IDLE_FOR = dt.timedelta(days=30)
IDLE_DAYS = 60


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Side:
    """One of the two databases: its storage, the threads it keeps, and the idle ones added."""

    def __init__(self, label: str, url: str, kept: int, per_thread: int, now: int, seed: int) -> None:
        self.label = label
        self.database = open_database(url)
        create_tables(self.database)
        self.storage = peewee_storage(self.database)
        self.dialect = self.storage.dialect.name
        self.kept_threads = max(1, kept // per_thread)
        self.per_thread = per_thread
        self.now = now
        self.rng = random.Random(seed)
        self.batches = 0
        self.checkpoint: Callable[[], Any] = lambda: None
        #: Runs a statement as the server's admin (a throwaway server's), for InnoDB's purge state.
        self.admin: Optional[Callable[[str], List[Tuple[Any, ...]]]] = None
        if self.dialect == "sqlite":
            self.checkpoint = lambda: self.database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _thread_id(self) -> str:
        return f"thread-{self.rng.getrandbits(64):016x}"  # random: idle and kept interleave by id

    def _load(self, threads: List[Tuple[str, int]], runs: List[Dict[str, Any]]) -> None:
        m = self.storage.models
        rows, messages = [], []
        for thread_id, updated in threads:
            rows.append({"id": thread_id, "agent_name": "bench", "title": "t", "created_at": updated - 60_000,
                         "updated_at": updated})
            for i in range(self.per_thread):
                at = updated - 60_000 + i
                messages.append({"id": f"{thread_id}:{at}:m{i}", "thread": thread_id, "created_at": at,
                                 "message": {"id": f"m{i}", "role": "user", "content": "hello there " * 4}})
        with self.storage.transaction():
            fast_load(self.storage, m.thread, rows)
            fast_load(self.storage, m.message, messages)
            fast_load(self.storage, m.run, runs)

    def build(self, step: int = 2_000) -> float:
        """The kept threads (recent; one in a hundred idle with a running run); seconds taken."""
        started = time.perf_counter()
        for start in range(0, self.kept_threads, step):
            threads, runs = [], []
            for i in range(start, min(start + step, self.kept_threads)):
                thread_id = self._thread_id()
                if i % 100 == 0:  # idle, but a run of it is running: prune must keep it
                    threads.append((thread_id, self.now - IDLE_DAYS * DAY - i))
                    runs.append({"run_id": f"run-{thread_id}", "agent_name": "bench", "thread_id": thread_id,
                                 "status": "running", "config": None, "started_at": self.now - 60_000,
                                 "updated_at": self.now - 60_000})
                else:
                    threads.append((thread_id, self.now - (i * 7919) % (7 * DAY)))
            self._load(threads, runs)
        return time.perf_counter() - started

    def add_idle(self, count: int, step: int = 2_000) -> float:
        """`count` threads not updated for IDLE_DAYS, with their messages; seconds."""
        started = time.perf_counter()
        for start in range(0, count, step):
            self._load([(self._thread_id(), self.now - IDLE_DAYS * DAY - i)
                        for i in range(start, min(start + step, count))], [])
        self.checkpoint()
        self.analyze()
        return time.perf_counter() - started

    def analyze(self) -> None:
        """Fresh statistics, as a live database has them (PostgreSQL: and its visibility map)."""
        db = self.database
        if self.dialect == "mysql":
            db.execute_sql("ANALYZE TABLE threads, messages, agent_runs").fetchall()
        elif self.dialect == "postgres":
            db.close()  # VACUUM runs outside a transaction: on a fresh connection
            db.connect()
            for table in ("threads", "messages", "agent_runs"):
                db.execute_sql(f"VACUUM ANALYZE {table}")
        else:
            db.execute_sql("ANALYZE")

    def settle(self, timeout: float = 300.0) -> float:
        """After a prune, outside the timing: what the server does later by itself (PostgreSQL's
        autovacuum, InnoDB's purge of the deleted rows) done or waited for now, so it does not
        run during the other side's timed prune; seconds taken."""
        t0 = time.perf_counter()
        self.checkpoint()
        if self.admin is not None:  # (the PROCESS privilege: the admin's)
            query = ("SELECT `count` FROM information_schema.INNODB_METRICS "
                     "WHERE name = 'trx_rseg_history_len'")
            while time.perf_counter() - t0 < timeout:
                rows = self.admin(query)
                if not rows or int(rows[0][0]) < 1000:
                    break
                time.sleep(1)
        self.analyze()
        return time.perf_counter() - t0

    def counts(self) -> Tuple[int, int]:
        """(threads, messages) in the database."""
        db = self.database
        return (int(db.execute_sql("SELECT COUNT(*) FROM threads").fetchone()[0]),
                int(db.execute_sql("SELECT COUNT(*) FROM messages").fetchone()[0]))

    def prune(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        report = self.storage.memory.prune_threads(IDLE_FOR, now_ms=self.now)
        return {"seconds": time.perf_counter() - t0, "threads": report.threads, "messages": report.messages,
                "batches": report.batches}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.database.close()


Samples = Dict[str, Dict[str, List[Dict[str, Any]]]]


def run(sides: List[Side], idle: int, rounds: int, timing: Timing) -> Samples:
    """Every case on every side, interleaved: {case: {side: [samples]}}."""
    cases: Samples = {}
    kept = {side.label: side.counts() for side in sides}
    name = f"prune of {idle:,} idle threads ({idle * sides[0].per_thread:,} messages)"
    for round_ in range(rounds):
        for side in sides:
            with timing.section():
                sample = side.prune()
            if sample["threads"] or sample["messages"]:
                raise AssertionError(f"{side.label}: prune with nothing idle deleted {sample}")
            cases.setdefault("nothing idle", {}).setdefault(side.label, []).append(sample)
        for side in sides:
            _log(f"  round {round_ + 1}: adding {idle:,} idle threads to {side.label}; load {load1():.2f}")
            side.add_idle(idle)
        # Each round in the other order, and each side settled after its prune (outside the timing),
        # so that neither side's prune shares the machine with the other's aftermath.
        for side in (sides if round_ % 2 == 0 else list(reversed(sides))):
            with timing.section():
                sample = side.prune()
            sample["settle_s"] = side.settle()
            expected = (idle, idle * side.per_thread)
            if (sample["threads"], sample["messages"]) != expected or side.counts() != kept[side.label]:
                raise AssertionError(f"{side.label}: prune deleted {sample}, left {side.counts()}; expected "
                                     f"{expected} deleted and {kept[side.label]} left")
            cases.setdefault(name, {}).setdefault(side.label, []).append(sample)
            _log(f"  {name} on {side.label}: {sample['seconds']:.2f} s")
    return cases


def summarise(cases: Samples) -> Dict[str, Dict[str, Any]]:
    """Median seconds per case and side; big / small."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, by_side in cases.items():
        row: Dict[str, Any] = {label: {"median_s": statistics.median(s["seconds"] for s in samples),
                                       "min_s": min(s["seconds"] for s in samples),
                                       "max_s": max(s["seconds"] for s in samples), "samples": len(samples)}
                               for label, samples in by_side.items()}
        row["ratio"] = row["big"]["median_s"] / max(row["small"]["median_s"], 1e-9)
        out[name] = row
    return out


def explain(side: Side, count: int) -> List[Dict[str, Any]]:
    """The plan of every SELECT and DELETE of one prune of `count` idle threads on `side`."""
    side.add_idle(count)
    seen: Dict[str, Tuple[str, Any]] = {}
    for sql, params in recorded(side.storage, side.prune):
        if sql.split(None, 1)[0].upper() in ("SELECT", "DELETE"):
            seen.setdefault(sql.split(" IN (")[0], (sql, params))
    side.add_idle(count)  # the same shapes again, to EXPLAIN against rows that exist
    prefix = "EXPLAIN QUERY PLAN " if side.dialect == "sqlite" else "EXPLAIN "
    plans = []
    for shape, (sql, params) in seen.items():
        rows = side.database.execute_sql(prefix + sql, params).fetchall()
        plans.append({"statement": shape, "plan": [" | ".join(str(c) for c in row) for row in rows]})
    side.prune()
    return plans


@contextlib.contextmanager
def open_sides(args: argparse.Namespace, now: int) -> Iterator[Tuple[List[Side], str, List[int]]]:
    """(small, big) on the chosen dialect, the server's version, and the pids to renice."""
    server, directory = None, None
    sides: List[Side] = []
    checkpoint: Optional[Callable[[str], Any]] = None
    try:
        pids = [os.getpid()]
        if args.small_url or args.big_url:
            if not (args.small_url and args.big_url):
                raise SystemExit("--small-url and --big-url go together")
            urls = {"small": args.small_url, "big": args.big_url}
        elif args.dialect == "sqlite":
            directory = tempfile.mkdtemp(prefix="bap-prune-threads-")
            urls = {label: f"sqlite:///{directory}/{label}.db" for label in ("small", "big")}
        else:
            from tests.servers import start_mariadb, start_postgres
            _log(f"starting a throwaway {args.dialect} server ...")
            server = (start_postgres if args.dialect == "postgres" else start_mariadb)()
            other = server.create_database("bap_prune_threads_small")
            suffix = "?charset=utf8mb4" if args.dialect == "mysql" else ""
            urls = {"small": other.url + suffix, "big": server.url + suffix}
            pids += [server.pid] if server.pid else []
            if args.dialect == "postgres":
                checkpoint = server.admin_execute  # CHECKPOINT needs a superuser
        sides = [Side("small", urls["small"], args.small, args.messages, now, 1),
                 Side("big", urls["big"], args.kept, args.messages, now, 2)]
        if checkpoint is not None:
            for side in sides:
                side.checkpoint = functools.partial(checkpoint, "CHECKPOINT")
        if server is not None and args.dialect == "mysql":
            for side in sides:
                side.admin = server.admin_execute
        query = {"sqlite": "SELECT sqlite_version()", "postgres": "SHOW server_version",
                 "mysql": "SELECT VERSION()"}[sides[0].dialect]
        version = str(sides[0].database.execute_sql(query).fetchone()[0]).split(" ")[0]
        yield sides, f"{sides[0].dialect} {version}", pids
    finally:
        for side in sides:
            side.close()
        if server is not None:
            server.stop()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def format_result(r: Dict[str, Any]) -> str:
    """The table of one dialect (markdown)."""
    small, big = f"{r['small']:,}", f"{r['kept']:,}"
    lines = [f"{r['server']}: kept messages {small} / {big} in threads of {r['messages']}; loads (1-min) "
             f"{r['load_min']}..{r['load_max']}", "",
             f"| prune_threads | {small} kept | {big} kept | big / small |", "|---|---:|---:|---:|"]
    for name, row in r["summary"].items():
        small_ms, big_ms = row["small"]["median_s"] * 1000, row["big"]["median_s"] * 1000
        lines.append(f"| {name} | {small_ms:.1f} ms | {big_ms:.1f} ms | {row['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.prune_threads",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS, default="sqlite")
    parser.add_argument("--kept", type=int, default=1_000_000, help="kept messages in the big database")
    parser.add_argument("--small", type=int, default=10_000, help="kept messages in the small database")
    parser.add_argument("--idle", type=int, default=10_000, help="idle threads pruned per timed call")
    parser.add_argument("--messages", type=int, default=100, help="messages per thread")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, interleaved")
    parser.add_argument("--lock", metavar="PATH", help="flock PATH (exclusive) around every timed part")
    parser.add_argument("--timed-priority", type=int, metavar="NICE",
                        help="run the timed parts at this niceness (this process and its server)")
    parser.add_argument("--small-url", help="an existing empty database for the small side")
    parser.add_argument("--big-url", help="an existing empty database for the big side")
    parser.add_argument("--explain", type=int, metavar="N",
                        help="at the end, EXPLAIN every statement of a prune of N idle threads (big side)")
    parser.add_argument("--quick", action="store_true", help="one round (the CI smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    for name in ("kept", "small", "idle", "messages", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.quick:
        args.rounds = 1
    now = int(time.time() * 1000)
    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; load {load1():.2f}")
    result: Dict[str, Any] = {"kept": args.kept, "small": args.small, "idle": args.idle,
                              "messages": args.messages, "rounds": args.rounds,
                              "priority": args.timed_priority}
    with open_sides(args, now) as (sides, version, pids):
        result["server"] = version
        result["build_s"] = {}
        for side in sides:
            _log(f"{args.dialect}: building {side.kept_threads * args.messages:,} kept messages for the "
                 f"{side.label} side; load {load1():.2f}")
            result["build_s"][side.label] = side.build()
            side.checkpoint()
            side.analyze()
        timing = Timing(args.lock, args.timed_priority, pids)
        cases = run(sides, args.idle, args.rounds, timing)
        result["cases"] = cases
        result["summary"] = summarise(cases)
        result["loads"] = [hold["load1"] for hold in timing.lock.holds]
        every = [load for pair in result["loads"] for load in pair]
        result["load_min"], result["load_max"] = min(every), max(every)
        result["locked_seconds"] = timing.lock.held_seconds
        if args.explain:
            result["explain"] = explain(sides[1], args.explain)
            for plan in result["explain"]:
                _log(plan["statement"] + "\n    " + "\n    ".join(plan["plan"]))
    print(format_result(result) + "\n", flush=True)
    path = write_results(args.json, f"prune-threads-{args.dialect}",
                         {"machine": info, "dialect": args.dialect, "result": result})
    _log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
