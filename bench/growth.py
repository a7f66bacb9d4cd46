"""W11, growth: what each lookup Better Agent makes costs at 10,000 rows and at 1,000,000.

    python -m bench.growth --dialect sqlite            # 10k then 1M rows (minutes; see below)
    python -m bench.growth --dialect all --large 100000
    python -m bench.growth --dialect sqlite --small 2000 --large 20000 --quick   # the CI smoke size

One process per dialect (a throwaway server, as the tests start). At each size it bulk-loads
the data with multi-row INSERTs, runs ANALYZE, and times every lookup twice: with our
performance indexes and without them (the shared schema alone, as the TypeScript adapters'
migrations make it). Then it grows the same tables to the large size (our indexes dropped
while loading), times `create_tables` adding them back (on PostgreSQL with
``CREATE INDEX CONCURRENTLY``), and times the lookups again. Growth = cost at the large size /
cost at the small size, with the indexes; it should stay at most 1.5.

Data at N rows: N runs (10 agents, 10 runs per thread, the same 50 running runs of agent-0
at every size, every finished run finished a day ago so prune has nothing to do), N/10
threads, N messages (half in one long thread, half 5 per thread across the others), N/10
streams with 10 events each. Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from better_agent_peewee import create_tables, drop_performance_indexes

from .env import machine, open_target
from .prune_scale import bulk_insert

DIALECTS = ("sqlite", "postgres", "mysql")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DAY = 86_400_000
AGENTS = 10
RUNNING = 50
LIMIT = 1.5


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Growth:
    """The W11 data of one target, built in steps, and the timed lookups."""

    def __init__(self, storage: Any, dialect: str, log: Callable[[str], None] = _log) -> None:
        self.storage = storage
        self.dialect = dialect
        self.log = log
        self.rows = 0  # runs (and messages) loaded so far
        self.now = int(time.time() * 1000)
        self.rng = random.Random(11)

    # -- data --------------------------------------------------------------------------------

    def grow(self, to: int, step: int = 20_000) -> float:
        """Add runs, threads, messages, streams and events up to `to` rows; seconds taken."""
        started = time.perf_counter()
        m = self.storage.models
        base = self.now - 400 * DAY
        if self.rows == 0:
            with self.storage.transaction():
                bulk_insert(self.storage, m.thread, [{"id": "thread-long", "agent_name": "agent-0",
                                                      "created_at": base, "updated_at": base}])
        for start in range(self.rows, to, step):
            end = min(start + step, to)
            runs, threads, messages, streams, events = [], [], [], [], []
            for i in range(start, end):
                run_id = f"run-{i:08d}"
                agent = f"agent-{i % AGENTS}"
                running = i < RUNNING * AGENTS and i % AGENTS == 0
                started_at = base + i * 10
                run: Dict[str, Any] = {
                    "run_id": run_id, "agent_name": agent, "thread_id": f"thread-{i // 10:07d}",
                    "scope": None, "status": "running" if running else ("completed", "failed")[i % 7 == 0],
                    "config": {"model": "m"}, "started_at": started_at,
                    "updated_at": self.now if running else self.now - DAY,
                    "finished_at": None if running else self.now - DAY,
                    "final_event": None if running else {"type": "RUN_FINISHED"}}
                if not running and i % 7 == 0:
                    run["final_event"] = {"type": "RUN_ERROR", "message": "x"}
                runs.append(run)
                if i % 10 == 0:
                    thread_id = f"thread-{i // 10:07d}"
                    threads.append({"id": thread_id, "agent_name": agent, "title": "t",
                                    "created_at": started_at, "updated_at": started_at + 5})
                    streams.append({"id": run_id, "run_id": run_id, "status": "open" if running else "closed",
                                    "created_at": started_at, "updated_at": started_at,
                                    "closed_at": None if running else started_at})
                    events += [{"id": f"{run_id}:{seq}", "run_id": run_id, "seq": seq,
                                "timestamp": started_at + seq,
                                "event": {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "tok "}}
                               for seq in range(1, 11)]
                # Half the messages in one long thread, half 5 to a thread across the others.
                thread_id = "thread-long" if i % 2 == 0 else f"thread-{i // 10:07d}"
                messages.append({"id": f"{thread_id}:{started_at}:m{i}", "thread": thread_id,
                                 "run_id": run_id, "created_at": started_at,
                                 "message": {"id": f"m{i}", "role": "user", "content": "hello there"}})
            with self.storage.transaction():
                bulk_insert(self.storage, m.thread, threads)
                bulk_insert(self.storage, m.run, runs)
                bulk_insert(self.storage, m.message, messages)
                bulk_insert(self.storage, m.stream, streams)
                bulk_insert(self.storage, m.stream_event, events)
        self.rows = to
        return time.perf_counter() - started

    def analyze(self) -> None:
        db = self.storage.database
        if self.dialect == "mysql":
            db.execute_sql("ANALYZE TABLE threads, messages, agent_runs, streams, stream_events").fetchall()
        elif self.dialect == "postgres":
            # VACUUM too, as autovacuum would by the time a table has grown this big: it sets the
            # visibility map (index-only scans) and the hint bits of the freshly loaded rows.
            db.execute_sql("VACUUM ANALYZE")
        else:
            db.execute_sql("ANALYZE")

    # -- lookups -----------------------------------------------------------------------------

    def lookups(self) -> List[Tuple[str, Callable[[], Any]]]:
        """(name, one call) for every lookup W11 times; each call picks its own key."""
        s = self.storage
        rng = self.rng
        n = self.rows

        def some_thread() -> str:
            return f"thread-{rng.randrange(n // 10):07d}"

        def some_stream() -> str:  # a closed one: streams of runs 0..499 are the open, running ones
            return f"run-{rng.randrange(RUNNING * AGENTS // 10, n // 10) * 10:08d}"

        def resume_poll() -> Any:
            run_id = some_stream()
            out = list(s.streams.resume(run_id, 5, poll_interval=0.001, timeout=5))
            return out

        return [
            ("runs.latest_for_thread", lambda: s.runs.latest_for_thread(some_thread())),
            ("runs.running(agent)", lambda: s.runs.running("agent-0")),
            ("messages.list(long thread, limit=20)", lambda: s.memory.messages.list("thread-long", limit=20)),
            ("messages.list(thread of 5)", lambda: s.memory.messages.list(some_thread())),
            ("threads.list(agent, limit=20)", lambda: s.memory.threads.list(agent_name="agent-3", limit=20)),
            ("runs.reap_stale (none stale)", lambda: s.runs.reap_stale(dt.timedelta(hours=1))),
            ("resume poll (closed stream)", resume_poll),
            ("runs.prune (nothing to do)", lambda: s.runs.prune(dt.timedelta(days=7))),
        ]

    def measure(self, rounds: int, batch_seconds: float) -> Dict[str, float]:
        """Median ms per call of each lookup."""
        out: Dict[str, float] = {}
        for name, call in self.lookups():
            for _ in range(3):
                call()
            t0 = time.perf_counter()
            call()
            once = max(time.perf_counter() - t0, 1e-6)
            ops = max(3, min(2000, int(batch_seconds / once)))
            per_call = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(ops):
                    call()
                per_call.append((time.perf_counter() - t0) / ops)
            out[name] = statistics.median(per_call) * 1000
        return out


def run_dialect(dialect: str, small: int, large: int, rounds: int, batch_seconds: float,
                log: Callable[[str], None] = _log) -> Dict[str, Any]:
    """W11 on one dialect: timings with and without our indexes at both sizes, build times."""
    result: Dict[str, Any] = {"small": small, "large": large}
    with open_target(dialect, log) as target:
        result["server"] = target.server_version
        g = Growth(target.storage, dialect, log)
        result["build_small_s"] = g.grow(small)
        g.analyze()
        result["small_with"] = g.measure(rounds, batch_seconds)
        drop_performance_indexes(target.database)
        g.analyze()
        result["small_without"] = g.measure(rounds, batch_seconds)
        log(f"{dialect}: {small:,} rows built in {result['build_small_s']:.1f}s and measured; "
            f"growing to {large:,} ...")
        result["build_large_s"] = g.grow(large)
        log(f"{dialect}: {large:,} rows built in {result['build_large_s']:.1f}s")
        g.analyze()
        result["large_without"] = g.measure(rounds, batch_seconds)
        t0 = time.perf_counter()
        result["indexes_added"] = create_tables(target.database, concurrently=True)
        result["create_indexes_s"] = time.perf_counter() - t0
        log(f"{dialect}: create_tables added {len(result['indexes_added'])} indexes in "
            f"{result['create_indexes_s']:.1f}s{' (CONCURRENTLY)' if dialect == 'postgres' else ''}")
        g.analyze()
        result["large_with"] = g.measure(rounds, batch_seconds)
    result["growth"] = {k: result["large_with"][k] / result["small_with"][k] for k in result["large_with"]}
    return result


def format_result(dialect: str, r: Dict[str, Any]) -> str:
    """The W11 table of one dialect (markdown)."""
    small, large = f"{r['small']:,}", f"{r['large']:,}"
    lines = [f"W11 {dialect} ({r['server']}): build {small} rows {r['build_small_s']:.1f}s, grow to {large} "
             f"{r['build_large_s']:.1f}s, add our indexes at {large} {r['create_indexes_s']:.1f}s",
             "",
             f"| lookup | {small} without | {small} with | {large} without | {large} with | growth (with) |",
             "|---|---|---|---|---|---|"]
    for name, growth in r["growth"].items():
        mark = "" if growth <= LIMIT else " MISS"
        lines.append(f"| {name} | {r['small_without'][name]:.3f} ms | {r['small_with'][name]:.3f} ms | "
                     f"{r['large_without'][name]:.3f} ms | {r['large_with'][name]:.3f} ms | "
                     f"{growth:.2f}x{mark} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point (0 even on a MISS: this is a measurement, not a test)."""
    parser = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS + ("all",), default="sqlite")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds of tiny batches (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    rounds, batch = (2, 0.005) if args.quick else (args.rounds, 0.2)
    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}")
    results = {}
    for dialect in DIALECTS if args.dialect == "all" else (args.dialect,):
        results[dialect] = run_dialect(dialect, args.small, args.large, rounds, batch)
        print(format_result(dialect, results[dialect]) + "\n", flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or os.path.join(RESULTS, f"{stamp}-w11-{args.dialect}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"generated": stamp, "machine": info, "dialects": results}, f, indent=1)
    _log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
