"""The inspector's pages on a big database: each page's p95 at 10,000 rows and at 1,000,000.

    python -m bench.inspector --dialect sqlite --lock /tmp/bench.lock          # 10,000 vs 1,000,000
    python -m bench.inspector --dialect postgres --large 200000
    python -m bench.inspector --dialect sqlite --small 300 --large 3000 --quick   # the CI smoke size

Two databases side by side (two SQLite files, or two databases on one throwaway server), each
holding bench.growth's data at N rows: N runs, N messages (half in one long thread), N stream
events (10 per stream), N/10 threads, over 10 agents; plus the same 5,000 runs of the last
week in both, so the overview's charts and percentiles have something to read. The inspector
serves each database on its own standard-library server (`make_inspector_server`, 127.0.0.1)
and every page is fetched over HTTP as a browser fetches it (a connection per request), with
another key each time (a random agent, thread or run). The rounds alternate the two sizes;
the figure is each page's p95 over all its requests, beside the large/small ratio. Target:
p95 under 200 ms at the large size. Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import http.client
import random
import signal
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from better_agent_peewee import open_database, peewee_storage
from better_agent_peewee.inspector import inspector_app, make_inspector_server

from .env import Target, machine, open_target, write_results
from .growth import AGENTS, DAY, SERVER_SETTINGS, Growth, _large_target
from .prune_scale import bulk_insert
from .quiet import BenchLock, load1

DIALECTS = ("sqlite", "postgres", "mysql")
TARGET_MS = 200.0
RECENT = 5_000


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_recent_runs(storage: Any, now: int, count: int = RECENT) -> None:
    """`count` runs of the last 7 days over the agents, every final status, with durations."""
    statuses = ("completed", "completed", "completed", "failed", "aborted", "interrupted")
    rng = random.Random(22)
    runs = []
    for i in range(count):
        started = now - rng.randrange(7 * DAY)
        status = statuses[i % len(statuses)]
        runs.append({"run_id": f"recent-{i:06d}", "agent_name": f"agent-{i % AGENTS}", "thread_id": None,
                     "scope": None, "status": status, "config": None, "started_at": started,
                     "updated_at": started + 1000, "finished_at": started + rng.randrange(200, 60_000),
                     "final_event": {"type": "RUN_FINISHED"}})
    with storage.transaction():
        bulk_insert(storage, storage.models.run, runs)


def pages(rows: int, rng: random.Random, base_ms: int) -> Dict[str, Callable[[], str]]:
    """Page name -> a function giving the next address to fetch (another key each time);
    `base_ms`: bench.growth's first start time (run i started at base + 10 i)."""
    def agent() -> str:
        return f"agent-{rng.randrange(AGENTS)}"

    def thread() -> str:
        return f"thread-{rng.randrange(max(rows // 10, 1)):07d}"

    def run() -> str:  # a run with a stream of 10 events (every tenth has one)
        return f"run-{rng.randrange(max(rows // 10, 1)) * 10:08d}"

    middle, middle_at = f"run-{rows // 2:08d}", base_ms + rows // 2 * 10
    return {
        "overview": lambda: "/",
        "threads of an agent": lambda: f"/agents/{agent()}/threads",
        "threads, title search (no match)": lambda: f"/agents/{agent()}/threads?q=zzz",
        # agent-0 owns every thread (bench.growth): a prefix of a tenth of its ids fills a page;
        # another agent's search reads an empty range of its own (agent, id).
        "threads, id prefix search": lambda: f"/agents/agent-0/threads?q=thread-00{rng.randrange(10)}",
        "threads, id prefix of another agent's ids": lambda: f"/agents/agent-{1 + rng.randrange(AGENTS - 1)}"
                                                             "/threads?q=thread-",
        "thread (the long one)": lambda: "/threads/thread-long",
        "thread of 5 messages": lambda: f"/threads/{thread()}",
        "runs": lambda: "/runs",
        "runs of an agent and status": lambda: f"/runs?agent={agent()}&status=completed",
        "runs since 24h": lambda: "/runs?since=24h",
        "runs, a page deep in the table": lambda: f"/runs?before_at={middle_at}&before_id={middle}",
        "run with its timeline": lambda: f"/runs/{run()}",
    }


def fetch(port: int, path: str) -> float:
    """Seconds to GET `path` whole, on a new connection (as wsgiref serves HTTP/1.0)."""
    t0 = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path, headers={"Host": "127.0.0.1"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
    finally:
        connection.close()
    return time.perf_counter() - t0


class Served:
    """The inspector over one target, on a free port, in a thread of this process."""

    def __init__(self, target: Target) -> None:
        # Pooled, as `better-agent-peewee inspect` opens it: a request's thread gives its
        # connection back when it ends.
        self.database = open_database(target.url, pooled=True)
        self.server = make_inspector_server(inspector_app(peewee_storage(self.database)), "127.0.0.1", 0)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.database.close_all()


def time_pages(sides: List[Served], groups: List[Growth], rounds: int, per_round: int, lock: BenchLock,
               label: str) -> List[Dict[str, List[float]]]:
    """Per side, page -> request times (ms), the sides alternating round by round."""
    makers = [pages(g.rows, random.Random(7), g.now - 400 * DAY) for g in groups]
    out: List[Dict[str, List[float]]] = [{} for _ in sides]
    with lock.hold(label):
        for name in makers[0]:
            for i, side in enumerate(sides):  # warm up: first requests open connections, fill caches
                for _ in range(2):
                    fetch(side.port, makers[i][name]())
            for r in range(rounds):
                order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
                for i in order:
                    times = out[i].setdefault(name, [])
                    for _ in range(per_round):
                        times.append(fetch(sides[i].port, makers[i][name]()) * 1000)
    return out


def p95(values: List[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(int(-(-95 * len(ordered) // 100)), 1) - 1]


def _build(growth: Growth, size: int, now: int) -> None:
    seconds = growth.grow(size)
    if not growth.storage.runs.get("recent-000000"):
        add_recent_runs(growth.storage, now)
    growth.analyze()
    growth.storage.database.close()
    _log(f"[{growth.dialect}] {size:,} rows built in {seconds:.0f}s")


def _timed(targets: List[Target], groups: List[Growth], rounds: int, per_round: int, lock: BenchLock,
           label: str) -> List[Dict[str, List[float]]]:
    sides = [Served(t) for t in targets]
    try:
        return time_pages(sides, groups, rounds, per_round, lock, label)
    finally:
        for side in sides:
            side.close()


def run_dialect(dialect: str, small: int, large: int, rounds: int, per_round: int,
                lock: BenchLock) -> Dict[str, Any]:
    """Build both sizes, serve them, time every page; the summary. Side by side (two databases)
    where this process started the server; in place (grow, time, grow, time) on a server by URL."""
    now = int(time.time() * 1000)
    load_before = load1()
    # The large data set's server settings (a MariaDB buffer pool that holds it), as bench.growth's.
    with open_target(dialect, log=_log, settings=SERVER_SETTINGS.get(dialect)) as target:
        server = target.server_version
        if dialect == "sqlite" or target.server.managed:
            with _large_target(target) as big:
                groups = [Growth(target.storage, dialect), Growth(big.storage, dialect)]
                _build(groups[0], small, now)
                _build(groups[1], large, now)
                times = _timed([target, big], groups, rounds, per_round, lock, f"inspector {dialect}")
        else:
            growth = Growth(target.storage, dialect)
            _build(growth, small, now)
            at_small = _timed([target], [growth], rounds, per_round, lock, f"inspector {dialect} small")
            _build(growth, large, now)
            label = f"inspector {dialect} large"
            times = at_small + _timed([target], [growth], rounds, per_round, lock, label)
    load_after = load1()
    rows = []
    for name in times[0]:
        a, b = times[0][name], times[1][name]
        rows.append({"page": name, "small_p95_ms": p95(a), "large_p95_ms": p95(b), "ratio": p95(b) / p95(a),
                     "small_p50_ms": statistics.median(a), "large_p50_ms": statistics.median(b),
                     "requests": len(b), "passed": p95(b) < TARGET_MS})
    return {"server": server, "server_settings": SERVER_SETTINGS.get(dialect, {}), "small": small,
            "large": large, "rows": rows,
            "load": [load_before, load_after], "lock_holds": lock.holds}


def format_result(dialect: str, result: Dict[str, Any]) -> str:
    """A markdown table of one dialect's pages."""
    lines = [f"inspector pages, {dialect} ({result['server']}), p95 over {result['rows'][0]['requests']} "
             f"requests each, load {result['load'][0]:.2f} -> {result['load'][1]:.2f}",
             f"| page | p95 at {result['small']:,} | p95 at {result['large']:,} | ratio | "
             f"target < {TARGET_MS:.0f} ms |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['page']} | {r['small_p95_ms']:.1f} ms | {r['large_p95_ms']:.1f} ms | "
                     f"×{r['ratio']:.2f} | {'PASS' if r['passed'] else 'MISS'} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point (0 even on a MISS: this is a measurement, not a test)."""
    parser = argparse.ArgumentParser(prog="python -m bench.inspector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS + ("all",), default="sqlite")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=10, help="requests per page, round and size")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 requests (smoke run)")
    parser.add_argument("--lock", metavar="PATH", help="flock this file while timing")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rounds, per_round = (2, 2) if args.quick else (args.rounds, args.per_round)
    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; load {load1():.2f}")
    lock = BenchLock(args.lock)
    results = {}
    for dialect in DIALECTS if args.dialect == "all" else (args.dialect,):
        results[dialect] = run_dialect(dialect, args.small, args.large, rounds, per_round, lock)
        print(format_result(dialect, results[dialect]) + "\n", flush=True)
    path = write_results(args.json, f"inspector-{args.dialect}",
                         {"machine": info, "quick": args.quick, "dialects": results})
    _log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
