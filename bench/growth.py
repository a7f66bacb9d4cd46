"""W11, growth: what each lookup Better Agent makes costs at 10,000 rows and at 1,000,000.

    nice -n 19 python -m bench.growth --dialect sqlite --lock /tmp/bench.lock --timing-nice 0
    python -m bench.growth --dialect all --large 100000
    python -m bench.growth --dialect sqlite --small 2000 --large 20000 --quick   # the CI smoke size

One process per dialect (a throwaway server, as the tests start). The two sizes live side by
side: two SQLite files, or two databases on the one server. Each is bulk-loaded with
multi-row INSERTs (the large one without our performance indexes, which `create_tables`
then adds back, timed; on PostgreSQL with ``CREATE INDEX CONCURRENTLY``) and ANALYZEd.
Every lookup is timed twice: with our indexes and without them (the shared schema alone, as
the TypeScript adapters' migrations make it). Growth = cost at the large size / cost at the
small size, with the indexes; it should stay at most 1.5.

How it times. Building a million rows takes minutes: under ``nice -n 19`` with
``--timing-nice 0`` the builds run at low CPU priority (this process and the throwaway
server's processes) without the benchmark lock, and for the timing priority goes back to
normal (root only) and, with ``--lock PATH``, the machine-wide benchmark lock is taken
(``flock``) around each timing phase only (without our indexes, then with them: about a
minute each). A lookup is timed in rounds, the small
and the large data set alternately (small first in one round, large first in the next);
each round is a batch of calls of about ``--batch`` seconds, every call with another key
(a random thread, stream or agent). The figure is the median over the rounds, the spread
their range; growth is the median of the rounds' large/small ratios. On a server given by
URL (``BAP_BENCH_POSTGRES_URL``, ``BAP_BENCH_MYSQL_URL``) there is one database: the tables
are grown in place and the two sizes are timed one after the other.

Data at N rows: N runs (10 agents, 10 runs per thread, the same 50 running runs of agent-0
at every size, every finished run finished a day ago so prune has nothing to do), N/10
threads, N messages (half in one long thread, half 5 per thread across the others), N/10
streams with 10 events each. Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import random
import resource
import signal
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from better_agent_peewee import create_tables
from better_agent_peewee.schema import drop_performance_indexes

from .env import Target, machine, open_target
from .prune_scale import bulk_insert
from .quiet import BenchLock, load1, renice

DIALECTS = ("sqlite", "postgres", "mysql")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DAY = 86_400_000
AGENTS = 10
RUNNING = 50
LIMIT = 1.5
#: Keys drawn per lookup and data set (cycled): enough that a batch seldom repeats one.
KEYS = 50_000
#: Settings of the throwaway servers that differ from the tests' (tests/servers.py), for a
#: database of a million rows. MariaDB reads with O_DIRECT, so what misses its buffer pool
#: is a disk read: the tests' 256 MB pool holds a quarter of the ~850 MB the large data set
#: takes, where a production server is given a pool that holds its working set (MariaDB's
#: guidance for a dedicated server: 50-75 % of its memory). PostgreSQL keeps the tests' 128 MB
#: shared_buffers: it reads through the operating system's page cache, so a miss is a copy.
SERVER_SETTINGS: Dict[str, Dict[str, str]] = {"mysql": {"innodb_buffer_pool_size": "2G"}}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def recorded(storage: Any, call: Callable[[], Any]) -> List[Tuple[str, Any]]:
    """The (sql, params) of every statement `call` sends through the storage's executor."""
    executor = storage.executor
    sent: List[Tuple[str, Any]] = []
    real = executor._execute_sql

    def record(sql: str, params: Any = None) -> Any:
        sent.append((sql, params))
        return real(sql, params)

    executor._execute_sql = record
    try:
        call()
    finally:
        executor._execute_sql = real
    return sent


class Priority:
    """CPU priority (niceness) of this process and of the database server's processes.

    With a `timing_nice`: `build_nice` (default: the niceness this process started with, as
    ``nice -n 19 python -m bench.growth`` gives it) while building, so that a build disturbs
    no one else's benchmark, and `timing_nice` while timing. Niceness on Linux is per thread,
    so it is set on every thread of every process. Going back to a lower niceness needs root
    (or RLIMIT_NICE); without, nothing is changed and `timing_nice_failed` says so. Without a
    `timing_nice`, nothing is changed either.
    """

    def __init__(self, build_nice: Optional[int], timing_nice: Optional[int], server_pid: Optional[int],
                 log: Callable[[str], None] = _log) -> None:
        start = os.getpriority(os.PRIO_PROCESS, 0)
        self.build_nice = start if build_nice is None else build_nice
        self.timing_nice = timing_nice
        self.server_pid = server_pid
        self.timing_nice_failed = False
        self.enabled = timing_nice is not None and timing_nice != self.build_nice
        if self.enabled:
            lowest = min(start, self.build_nice, timing_nice or 0)
            allowed = os.geteuid() == 0 or lowest >= 20 - resource.getrlimit(resource.RLIMIT_NICE)[0]
            if lowest < start and not allowed:
                log(f"cannot go back to niceness {lowest} (needs root): priority left at {start} throughout")
                self.enabled = False
                self.timing_nice_failed = True

    def _set(self, value: int) -> None:
        renice([os.getpid()] + ([self.server_pid] if self.server_pid else []), value)

    def build(self) -> None:
        """Build priority (low)."""
        if self.enabled:
            self._set(self.build_nice)

    def timing(self) -> None:
        """Timing priority (normal)."""
        if self.enabled and self.timing_nice is not None:
            self._set(self.timing_nice)


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
        """(name, one call) for every lookup W11 times; each call takes the next of its keys."""
        s = self.storage
        rng = self.rng
        n = self.rows

        def keys(make: Callable[[], str]) -> Callable[[], str]:
            return itertools.cycle([make() for _ in range(KEYS)]).__next__

        thread = keys(lambda: f"thread-{rng.randrange(n // 10):07d}")
        # A closed stream: the streams of runs 0..499 are the open, running ones.
        stream = keys(lambda: f"run-{rng.randrange(RUNNING * AGENTS // 10, n // 10) * 10:08d}")
        agent = keys(lambda: f"agent-{rng.randrange(AGENTS)}")

        def resume_poll() -> Any:
            return list(s.streams.resume(stream(), 5, poll_interval=0.001, timeout=5))

        return [
            ("runs.latest_for_thread", lambda: s.runs.latest_for_thread(thread())),
            ("runs.running(agent)", lambda: s.runs.running("agent-0")),
            ("messages.list(long thread, limit=20)", lambda: s.memory.messages.list("thread-long", limit=20)),
            ("messages.list(thread of 5)", lambda: s.memory.messages.list(thread())),
            ("threads.list(agent, limit=20)", lambda: s.memory.threads.list(agent_name=agent(), limit=20)),
            ("runs.reap_stale (none stale)", lambda: s.runs.reap_stale(dt.timedelta(hours=1))),
            ("resume poll (closed stream)", resume_poll),
            ("runs.prune (nothing to do)", lambda: s.runs.prune(dt.timedelta(days=7))),
        ]

    def plans(self) -> Dict[str, List[Dict[str, Any]]]:
        """Each lookup's SELECTs (one call) with their plan as the database ran them.

        SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN (ANALYZE, BUFFERS); MySQL/MariaDB:
        ANALYZE (MariaDB) or EXPLAIN ANALYZE (MySQL). Statements sent outside the storage's
        executor (the followers' poller) are not seen.
        """
        db = self.storage.database
        out: Dict[str, List[Dict[str, Any]]] = {}
        for name, call in self.lookups():
            out[name] = []
            for sql, params in recorded(self.storage, call):
                if not sql.lstrip().upper().startswith("SELECT"):
                    continue
                prefix = {"sqlite": "EXPLAIN QUERY PLAN ", "postgres": "EXPLAIN (ANALYZE, BUFFERS) ",
                          "mysql": "ANALYZE "}[self.dialect]
                try:
                    cursor = db.execute_sql(prefix + sql, params)
                    rows = cursor.fetchall()
                    if self.dialect == "sqlite":
                        plan = [str(r[3]) for r in rows]
                    elif self.dialect == "postgres":
                        plan = [str(r[0]) for r in rows]
                    else:
                        names = [d[0] for d in cursor.description]
                        plan = [", ".join(f"{k}={v}" for k, v in zip(names, r)
                                          if k in ("table", "type", "key", "rows", "r_rows", "filtered",
                                                   "r_filtered", "Extra") and v is not None) for r in rows]
                except Exception as exc:  # a statement this EXPLAIN form does not take
                    plan = [f"(not explained: {exc})"]
                out[name].append({"sql": sql, "plan": plan})
        return out


Summaries = Dict[str, Dict[str, Any]]
#: One {lookup: summary} per data set, and the per-round ratios of the second to the first.
Timings = Tuple[List[Summaries], Dict[str, List[float]]]


def _summary(per_call_s: List[float], calls: int) -> Dict[str, Any]:
    ms = [t * 1000 for t in per_call_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "rounds_ms": ms, "calls_per_round": calls}


def time_lookups(groups: List[Growth], rounds: int, batch_seconds: float, lock: BenchLock,
                 priority: Priority, label: str) -> Timings:
    """Time every lookup on each data set of `groups`, alternating between them round by round.

    Returns one {lookup: summary} per group and, for two groups, each lookup's per-round
    ratios (second / first).
    """
    priority.timing()
    calls = [dict(g.lookups()) for g in groups]
    out: List[Summaries] = [{} for _ in groups]
    ratios: Dict[str, List[float]] = {}
    # One hold for the phase (about a minute): waiting for the lock once per lookup behind
    # other benchmarks' holds made a run take several times as long.
    with lock.hold(label):
        for name in calls[0]:
            ops = []
            for group_calls in calls:
                call = group_calls[name]
                n, t0 = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - t0 < batch_seconds:  # warm up, and size the batch
                    call()
                    n += 1
                once = max((time.perf_counter() - t0) / n, 1e-7)
                ops.append(max(1, min(20_000, int(batch_seconds / once))))
            per_round: List[List[float]] = [[] for _ in groups]
            for r in range(rounds):
                for i in (range(len(groups)) if r % 2 == 0 else reversed(range(len(groups)))):
                    call = calls[i][name]
                    t0 = time.perf_counter()
                    for _ in range(ops[i]):
                        call()
                    per_round[i].append((time.perf_counter() - t0) / ops[i])
            for i in range(len(groups)):
                out[i][name] = _summary(per_round[i], ops[i])
            if len(groups) == 2:
                ratios[name] = [large / small for small, large in zip(*per_round)]
    return out, ratios


@contextlib.contextmanager
def _large_target(target: Target) -> Iterator[Target]:
    """A second, empty database beside `target`: another SQLite file, or another database on its server."""
    if target.sqlite_path:
        path = os.path.join(os.path.dirname(target.sqlite_path), "large.db")
        large = Target("sqlite", f"sqlite:///{path}", sqlite_path=path)
    else:
        view = target.server.create_database("bap_w11_large")
        large = Target(target.dialect, view.url + ("?charset=utf8mb4" if target.dialect == "mysql" else ""),
                       server=view)
    try:
        yield large
    finally:
        large.close()


def run_dialect(dialect: str, small: int, large: int, rounds: int, batch_seconds: float,
                lock: Optional[BenchLock] = None, build_nice: Optional[int] = None,
                timing_nice: Optional[int] = None,
                in_place: bool = False, explain: bool = False, settings: Optional[Dict[str, str]] = None,
                log: Callable[[str], None] = _log) -> Dict[str, Any]:
    """W11 on one dialect: timings with and without our indexes at both sizes, build times.

    `settings` go to a throwaway server (default: `SERVER_SETTINGS` of the dialect).
    """
    lock = lock or BenchLock(None, log)
    first_hold = len(lock.holds)
    result: Dict[str, Any] = {"small": small, "large": large, "rounds": rounds, "batch_s": batch_seconds,
                              "load_start": os.getloadavg()}
    settings = dict(SERVER_SETTINGS.get(dialect, {}) if settings is None else settings)
    with open_target(dialect, log, settings=settings) as target:
        result["server"] = target.server_version
        result["server_settings"] = settings if target.server is not None and target.server.managed else {}
        server = target.server
        server_pid = server.pid if server is not None and server.managed else None
        priority = Priority(build_nice, timing_nice, server_pid, log)
        side_by_side = not in_place and (dialect == "sqlite" or server.managed)
        result["mode"] = "side by side" if side_by_side else "in place"
        priority.build()
        g = Growth(target.storage, dialect, log)
        result["build_small_s"] = g.grow(small)
        g.analyze()
        if side_by_side:
            with _large_target(target) as big_target:
                big = Growth(big_target.storage, dialect, log)
                drop_performance_indexes(big_target.database)
                log(f"{dialect}: {small:,} rows built in {result['build_small_s']:.1f}s; "
                    f"building {large:,} ...")
                result["build_large_s"] = big.grow(large)
                log(f"{dialect}: {large:,} rows built in {result['build_large_s']:.1f}s")
                big.analyze()
                drop_performance_indexes(target.database)
                g.analyze()
                (result["small_without"], result["large_without"]), _ = _timed(
                    [g, big], rounds, batch_seconds, lock, priority, "without", result)
                priority.build()
                create_tables(target.database)
                t0 = time.perf_counter()
                result["indexes_added"] = create_tables(big_target.database, concurrently=True)
                result["create_indexes_s"] = time.perf_counter() - t0
                _log_indexes(dialect, result, log)
                g.analyze()
                big.analyze()
                (result["small_with"], result["large_with"]), paired = _timed(
                    [g, big], rounds, batch_seconds, lock, priority, "with", result)
                result["growth_rounds"] = paired
                if explain:
                    priority.timing()
                    result["plans"] = {"small": g.plans(), "large": big.plans()}
                priority.build()
        else:
            def alone(label: str) -> Summaries:
                return _timed([g], rounds, batch_seconds, lock, priority, label, result)[0][0]

            result["small_with"] = alone("small with")
            priority.build()
            drop_performance_indexes(target.database)
            g.analyze()
            result["small_without"] = alone("small without")
            priority.build()
            log(f"{dialect}: {small:,} rows built in {result['build_small_s']:.1f}s and measured; "
                f"growing to {large:,} ...")
            result["build_large_s"] = g.grow(large)
            log(f"{dialect}: {large:,} rows built in {result['build_large_s']:.1f}s")
            g.analyze()
            result["large_without"] = alone("large without")
            priority.build()
            t0 = time.perf_counter()
            result["indexes_added"] = create_tables(target.database, concurrently=True)
            result["create_indexes_s"] = time.perf_counter() - t0
            _log_indexes(dialect, result, log)
            g.analyze()
            result["large_with"] = alone("large with")
        result["niceness"] = {"build": priority.build_nice, "timing": timing_nice,
                              "changed": priority.enabled,
                              "server_reniced": priority.enabled and priority.server_pid is not None}
    result["lock_holds"] = lock.holds[first_hold:]
    result["load_end"] = os.getloadavg()
    ratios: Optional[Dict[str, List[float]]] = result.get("growth_rounds")
    result["growth"] = {k: (statistics.median(ratios[k]) if ratios else
                            result["large_with"][k]["median_ms"] / result["small_with"][k]["median_ms"])
                        for k in result["large_with"]}
    # The medians (ms) under the keys earlier results used; the rounds are in "spread".
    result["spread"] = {}
    for key in ("small_with", "small_without", "large_with", "large_without"):
        result["spread"][key] = result[key]
        result[key] = {k: v["median_ms"] for k, v in result[key].items()}
    return result


def _timed(groups: List[Growth], rounds: int, batch_seconds: float, lock: BenchLock, priority: Priority,
           label: str, result: Dict[str, Any]) -> Timings:
    t0 = time.perf_counter()
    out = time_lookups(groups, rounds, batch_seconds, lock, priority, label)
    result.setdefault("timing_s", {})[label] = round(time.perf_counter() - t0, 1)
    return out


def _log_indexes(dialect: str, result: Dict[str, Any], log: Callable[[str], None]) -> None:
    log(f"{dialect}: create_tables added {len(result['indexes_added'])} indexes in "
        f"{result['create_indexes_s']:.1f}s{' (CONCURRENTLY)' if dialect == 'postgres' else ''}")


def format_result(dialect: str, r: Dict[str, Any]) -> str:
    """The W11 table of one dialect (markdown): medians, the large size's range, growth and its range."""
    small, large = f"{r['small']:,}", f"{r['large']:,}"
    holds = r.get("lock_holds") or [{"load1": [0.0, 0.0]}]
    loads = [x for h in holds for x in h["load1"]]
    configured = ", ".join(f"{k}={v}" for k, v in r.get("server_settings", {}).items())
    lines = [f"W11 {dialect} ({r['server']}{', ' + configured if configured else ''}, {r['mode']}): "
             f"build {small} rows {r['build_small_s']:.1f}s, "
             f"{large} rows {r['build_large_s']:.1f}s, "
             f"add our indexes at {large} {r['create_indexes_s']:.1f}s; "
             f"{r['rounds']} rounds of ~{r['batch_s']}s; load average while timing "
             f"{min(loads):.2f}-{max(loads):.2f}",
             "",
             f"| lookup | {small} without | {small} with | {large} without | {large} with (range) "
             f"| growth (range) |",
             "|---|---|---|---|---|---|"]
    for name, growth in r["growth"].items():
        mark = "" if growth <= LIMIT else " MISS"
        big = r["spread"]["large_with"][name]
        rounds = r.get("growth_rounds", {}).get(name)
        span = f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
        lines.append(f"| {name} | {r['small_without'][name]:.3f} ms | {r['small_with'][name]:.3f} ms | "
                     f"{r['large_without'][name]:.3f} ms | {r['large_with'][name]:.3f} ms "
                     f"({big['min_ms']:.3f}-{big['max_ms']:.3f}) | {growth:.2f}x{span}{mark} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point (0 even on a MISS: this is a measurement, not a test)."""
    parser = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS + ("all",), default="sqlite")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=float, default=0.25,
                        help="seconds per round and data set (default 0.25)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of tiny batches (smoke run)")
    parser.add_argument("--lock", metavar="PATH", help="flock this file around each timing phase")
    parser.add_argument("--timing-nice", type=int, metavar="N",
                        help="niceness while timing, this process's and the server's (0 under nice -n 19)")
    parser.add_argument("--build-nice", type=int, metavar="N",
                        help="niceness while building, with --timing-nice (default: the starting niceness)")
    parser.add_argument("--in-place", action="store_true",
                        help="grow one database, not two side by side (as a server given by URL is)")
    parser.add_argument("--explain", action="store_true",
                        help="also record each lookup's plans at both sizes")
    parser.add_argument("--server-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a throwaway server's setting, instead of SERVER_SETTINGS (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the temp files and the throwaway servers go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings: Optional[Dict[str, str]] = None
    if args.server_setting:
        if any("=" not in item for item in args.server_setting):
            parser.error("--server-setting takes NAME=VALUE")
        settings = dict(item.split("=", 1) for item in args.server_setting)
    rounds, batch = (2, 0.005) if args.quick else (args.rounds, args.batch)
    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; load {load1():.2f}")
    lock = BenchLock(args.lock)
    results = {}
    for dialect in DIALECTS if args.dialect == "all" else (args.dialect,):
        results[dialect] = run_dialect(dialect, args.small, args.large, rounds, batch, lock=lock,
                                       build_nice=args.build_nice, timing_nice=args.timing_nice,
                                       in_place=args.in_place, explain=args.explain, settings=settings)
        print(format_result(dialect, results[dialect]) + "\n", flush=True)
        if args.explain:
            for size in ("small", "large"):
                for name, statements in results[dialect]["plans"][size].items():
                    for st in statements:
                        _log(f"[{dialect} {size}] {name}: " + " | ".join(st["plan"]))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or os.path.join(RESULTS, f"{stamp}-w11-{args.dialect}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"generated": stamp, "machine": info, "dialects": results}, f, indent=1)
    _log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
