"""The nightly prune at scale: what a prune costs next to what the database keeps.

    nice -n 19 python -m bench.prune_kept --dialect sqlite --lock /tmp/bench.lock --timed-priority 0
    nice -n 19 python -m bench.prune_kept --dialect postgres --explain 10000 --baseline REV ...
    nice -n 19 python -m bench.prune_kept --dialect mysql --server-setting innodb_buffer_pool_size=2G
    python -m bench.prune_kept --dialect sqlite --kept 3000 --small 300 --prune 20 --quick

Two databases of the same shape, side by side (two SQLite files, or two databases of one
throwaway server): a big one holding `--kept` runs that prune must keep (default 1,000,000,
with 10 events each in their streams: 10,000,000 events) and a small one holding `--small`
(default 10,000, 100,000 events). Kept runs are recent (finished within the last six days),
running (1 %) or interrupted a month ago (1 %: old, but prune keeps interrupted runs). Run ids
are random hex, so old and kept runs interleave in every key order, as they do in life.

Timed, on both databases, interleaved (small then big, every round):

* prune with nothing to delete, default orphan window; with ``orphan_scan=0`` (the
  finished-runs lookup alone); with ``orphan_scan=None`` (the full orphan sweep);
* for each ``--prune`` P (default 1,000 and 10,000): P runs finished a month ago, with 10
  events each, added (outside the timing, then checkpointed) and pruned, with the default
  window and with ``orphan_scan=0`` (the deletes alone).

``--baseline REV`` times prune.py as it was at git REV too, interleaved with the current
one; ``--explain P`` prints the plan of every statement of one prune of P runs at the big
size; ``--sqlite-dir DIR`` keeps the SQLite files and reuses them next time.

Big / small is the figure: a prune should cost what it deletes, not what the tables keep,
so it should stay near 1 (except where the window, 1,000 keys plus ten per pruned run, is
bigger than the small database's tables: there the small one is swept whole).

Data is loaded with COPY (PostgreSQL) or executemany (SQLite, MySQL/MariaDB) in large
transactions; run the whole command under ``nice -n 19``. Only the timed parts hold
``--lock`` (an exclusive flock on that file, the machine-wide benchmark lock) and, with
``--timed-priority``, run at that priority (this process and the server it started; root
only, back to the starting niceness afterwards). Peak RSS is this process's high-water mark
during the prune call (reset just before it), minus its RSS right before. Not a test:
nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from better_agent_peewee import create_tables, open_database, peewee_storage
from better_agent_peewee.prune import prune_runs

from .env import machine, write_results
from .quiet import BenchLock, load1, renice

DIALECTS = ("sqlite", "postgres", "mysql")
DAY = 86_400_000
KEEP = dt.timedelta(days=7)
OLD_DAYS = 30


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- fast loading -------------------------------------------------------------------------

def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def fast_load(storage: Any, model: Any, rows: Sequence[Dict[str, Any]]) -> None:
    """Insert `rows` (field name -> Python value, encoded by the model's own fields) the fastest
    way the driver offers: COPY on PostgreSQL, executemany elsewhere. No transaction of its own."""
    if not rows:
        return
    db = storage.database
    names = list(rows[0])
    fields = [model._meta.fields[name] for name in names]
    dialect = storage.dialect.name
    quote = "`" if dialect == "mysql" else '"'
    columns = ", ".join(f"{quote}{f.column_name}{quote}" for f in fields)
    table = f"{quote}{model._meta.table_name}{quote}"
    values = [tuple(f.db_value(row[name]) for name, f in zip(names, fields)) for row in rows]
    cursor = db.cursor()
    if dialect == "postgres":
        text = "".join("\t".join(_copy_text(v) for v in row) + "\n" for row in values)
        sql = f"COPY {table} ({columns}) FROM STDIN"
        if hasattr(cursor, "copy_expert"):  # psycopg2
            cursor.copy_expert(sql, io.StringIO(text))
        else:  # psycopg 3
            with cursor.copy(sql) as copy:
                copy.write(text)
        return
    marks = ", ".join([db.param] * len(fields))
    cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", values)


# -- one database ---------------------------------------------------------------------------

class Side:
    """One of the two databases: its storage, what it keeps, and the old runs added to it."""

    def __init__(self, label: str, url: str, kept: int, events: int, now: int, seed: int) -> None:
        self.label = label
        self.url = url
        self.database = open_database(url)
        create_tables(self.database)
        self.storage = peewee_storage(self.database)
        self.dialect = self.storage.dialect.name
        self.kept = kept
        self.events = events
        self.now = now
        self.rng = random.Random(seed)
        self.old_batches = 0
        self.old_rng = random.Random()  # not the kept runs' sequence: a reused database has those
        #: Writes back what a load left dirty (outside the timing): a checkpoint.
        self.checkpoint: Callable[[], None] = lambda: None
        if self.dialect == "sqlite":
            self.checkpoint = lambda: self.database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _run_id(self, rng: Optional[random.Random] = None) -> str:
        return f"run-{(rng or self.rng).getrandbits(64):016x}"

    def _load_runs(self, runs: List[Dict[str, Any]], per_run: int) -> None:
        m = self.storage.models
        streams, events = [], []
        for run in runs:
            run_id, started = run["run_id"], run["started_at"]
            closed = run["finished_at"]
            streams.append({"id": run_id, "run_id": run_id, "status": "open" if closed is None else "closed",
                            "created_at": started, "updated_at": closed or started, "closed_at": closed})
            # Key order inside the run ("...:1", "...:10", "...:2"): index appends stay sequential.
            for seq in sorted(range(1, per_run + 1), key=str):
                events.append({"id": f"{run_id}:{seq}", "run_id": run_id, "seq": seq,
                               "timestamp": started + seq,
                               "event": {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m",
                                         "delta": "token " * 8}})
        with self.storage.transaction():
            fast_load(self.storage, m.run, runs)
            fast_load(self.storage, m.stream, streams)
            fast_load(self.storage, m.stream_event, events)

    def build(self, step: int = 20_000) -> float:
        """The kept runs, each with a stream and `events` events, in key order; seconds taken."""
        started = time.perf_counter()
        ids = sorted({self._run_id() for _ in range(self.kept)})
        while len(ids) < self.kept:  # 64-bit collisions: practically never
            ids = sorted(set(ids) | {self._run_id()})
        statuses = ("completed", "failed", "aborted")
        for start in range(0, self.kept, step):
            runs = []
            for i in range(start, min(start + step, self.kept)):
                kind = i % 100
                if kind == 0:  # running, started within the hour
                    began, status, finished = self.now - 3_600_000 + i % 3_000_000, "running", None
                elif kind == 1:  # interrupted a month ago: old, but kept (it waits for a human)
                    began = self.now - OLD_DAYS * DAY - 60_000
                    status, finished = "interrupted", began + 60_000
                else:  # finished within the last six days
                    began = self.now - (i * 7919) % (6 * DAY) - 60_000
                    status, finished = statuses[i % 3], began + 60_000
                runs.append(self._run(ids[i], status, began, finished))
            self._load_runs(runs, self.events)
        return time.perf_counter() - started

    def _run(self, run_id: str, status: str, began: int, finished: Optional[int]) -> Dict[str, Any]:
        final = None if finished is None else (
            {"type": "RUN_FINISHED"} if status == "completed" else {"type": "RUN_ERROR", "message": "x"})
        return {"run_id": run_id, "agent_name": "bench", "thread_id": None, "status": status,
                "config": {"model": "x"}, "started_at": began, "updated_at": finished or began,
                "finished_at": finished, "final_event": final}

    def add_old(self, count: int, per_run: int = 10, step: int = 5_000) -> float:
        """`count` runs finished a month ago (what the next prune deletes), random ids; seconds."""
        started = time.perf_counter()
        statuses = ("completed", "failed", "aborted")
        base = self.now - OLD_DAYS * DAY
        for start in range(0, count, step):
            runs = [self._run(self._run_id(self.old_rng), statuses[i % 3], base - 60_000 + i, base + i)
                    for i in range(start, min(start + step, count))]
            self._load_runs(runs, per_run)
        # Else the prune timed next would pay for writing back what this load left dirty (SQLite's
        # WAL checkpoint runs on a commit once the WAL is big; PostgreSQL's when it comes due).
        self.checkpoint()
        self.old_batches += 1
        return time.perf_counter() - started

    def analyze(self) -> None:
        """Fresh statistics (and PostgreSQL's visibility map), as a live database has them."""
        db = self.database
        if self.dialect == "mysql":
            db.execute_sql("ANALYZE TABLE agent_runs, streams, stream_events").fetchall()
        elif self.dialect == "postgres":
            db.close()
            db.connect()
            db.execute_sql("VACUUM ANALYZE agent_runs")
            db.execute_sql("VACUUM ANALYZE streams")
            db.execute_sql("VACUUM ANALYZE stream_events")
        else:
            db.execute_sql("ANALYZE")

    def count_runs(self) -> int:
        return int(self.database.execute_sql("SELECT COUNT(*) FROM agent_runs").fetchone()[0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.database.close()


# -- timing ---------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def timed_prune(side: Side, prune: Callable[..., Any] = prune_runs, **options: Any) -> Dict[str, Any]:
    """One prune call on `side`: seconds, RSS before, peak growth, and what it deleted."""
    gc.collect()
    before = _status_kb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    report = prune(side.storage, KEEP, now_ms=side.now, **options)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else _status_kb("VmRSS")
    return {"seconds": seconds, "rss_before_mb": before / 1024, "rss_growth_mb": max(0, peak - before) / 1024,
            "runs": report.runs, "streams": report.streams, "events": report.events,
            "batches": report.batches}


class Timing:
    """The timed sections: under the benchmark lock and at the timed priority, loads noted."""

    def __init__(self, lock: Optional[str], priority: Optional[int], pids: Sequence[int]) -> None:
        self.lock = BenchLock(lock)
        self.priority = priority
        self.pids = list(pids)
        self.idle = os.getpriority(os.PRIO_PROCESS, 0)

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        """Time the block under the lock, at the timed priority."""
        with self.lock.hold("prune"):
            if self.priority is not None:
                renice(self.pids, self.priority)
            try:
                yield
            finally:
                if self.priority is not None:
                    renice(self.pids, self.idle)


class _Statements(logging.Handler):
    """Collects the (sql, params) peewee logs at DEBUG for every statement it runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: List[Tuple[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, tuple) and len(record.msg) == 2:
            self.seen.append(record.msg)


def explain(side: Side, count: int) -> List[Dict[str, Any]]:
    """The plan of every statement one prune of `count` old runs runs on `side` (one per shape:
    IN lists of any length count as one), as the server plans it at this size."""
    side.add_old(count)
    handler, log = _Statements(), logging.getLogger("peewee")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        prune_runs(side.storage, KEEP, now_ms=side.now)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    shapes: Dict[str, Tuple[str, Any]] = {}
    for sql, params in handler.seen:
        if sql.split(None, 1)[0].upper() in ("SELECT", "DELETE"):
            shapes.setdefault(re.sub(r"(\?|%s)(, (\?|%s))+", "...", sql), (sql, params))
    prefix = "EXPLAIN QUERY PLAN " if side.dialect == "sqlite" else "EXPLAIN "
    plans = []
    for shape, (sql, params) in shapes.items():
        rows = side.database.execute_sql(prefix + sql, params).fetchall()
        plans.append({"statement": shape, "plan": [" | ".join(str(c) for c in row) for row in rows]})
    return plans


# -- the benchmark --------------------------------------------------------------------------

NOTHING: Tuple[Tuple[str, Dict[str, Any]], ...] = (("nothing to delete, default window", {}),
           ("nothing to delete, orphan_scan=0 (finished-runs lookup only)", {"orphan_scan": 0}),
           ("nothing to delete, orphan_scan=None (full orphan sweep)", {"orphan_scan": None}))
#: The prunes of old runs: with the default window, and without any sweep (the deletes alone).
PRUNES: Tuple[Tuple[str, Dict[str, Any]], ...] = (("default window", {}),
                                                  ("orphan_scan=0", {"orphan_scan": 0}))


def run(sides: Sequence[Side], prunes: Sequence[int], rounds: int, repeat: int, timing: Timing,
        implementations: Sequence[Tuple[str, Callable[..., Any]]] = (("", prune_runs),),
        log: Callable[[str], None] = _log) -> Dict[str, Any]:
    """The timed prunes on every side (and with every implementation: `label`, prune_runs),
    interleaved; {case: {side: [samples]}}, one case per implementation (label appended)."""
    cases: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}

    def note(name: str) -> None:
        log(f"  {name}: " + ", ".join(
            f"{s.label} {statistics.median(x['seconds'] for x in cases[name][s.label]) * 1000:.1f} ms"
            for s in sides))

    for _ in range(rounds):
        for (case, options), (suffix, prune) in itertools.product(NOTHING, implementations):
            name = case + suffix
            for side in sides:
                with timing.section():
                    samples = [timed_prune(side, prune, **options) for _ in range(repeat)]
                if any(s["runs"] or s["streams"] or s["events"] for s in samples):
                    raise AssertionError(f"{side.label}: prune with nothing old enough deleted {samples}")
                cases.setdefault(name, {}).setdefault(side.label, []).extend(samples)
            note(name)
    added: Dict[str, Dict[str, List[float]]] = {}
    for count, (window, options) in itertools.product(prunes, PRUNES):
        for _ in range(rounds):
            for suffix, prune in implementations:
                name = f"prune of {count:,} runs ({count * 10:,} events), {window}{suffix}"
                for side in sides:
                    added.setdefault(str(count), {}).setdefault(side.label, []).append(side.add_old(count))
                with timing.section():
                    pruned = {side.label: timed_prune(side, prune, **options) for side in sides}
                for label, sample in pruned.items():
                    if (sample["runs"], sample["streams"], sample["events"]) != (count, count, count * 10):
                        raise AssertionError(f"{label}: prune of {count} old runs deleted {sample}")
                    cases.setdefault(name, {}).setdefault(label, []).append(sample)
        for suffix, _prune in implementations:
            note(f"prune of {count:,} runs ({count * 10:,} events), {window}{suffix}")
    return {"cases": cases, "add_old_seconds": added}


def baseline_prune(revision: str) -> Callable[..., Any]:
    """`prune_runs` as better_agent_peewee/prune.py was at git `revision` (run side by side)."""
    import importlib.util
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{revision}:better_agent_peewee/prune.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    folder = tempfile.mkdtemp(prefix="bap-baseline-")
    path = os.path.join(folder, "prune.py")
    with open(path, "w") as f:
        f.write(source)
    try:
        spec = importlib.util.spec_from_file_location("better_agent_peewee._baseline_prune", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)  # its relative imports resolve inside better_agent_peewee
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    found: Callable[..., Any] = module.prune_runs
    return found


def summarise(cases: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> Dict[str, Dict[str, Any]]:
    """Median seconds and the largest RSS growth per case and side; big / small."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, by_side in cases.items():
        row: Dict[str, Any] = {}
        for label, samples in by_side.items():
            row[label] = {"median_s": statistics.median(s["seconds"] for s in samples),
                          "min_s": min(s["seconds"] for s in samples),
                          "max_s": max(s["seconds"] for s in samples),
                          "rss_growth_mb": max(s["rss_growth_mb"] for s in samples), "samples": len(samples)}
        if "big" in row and "small" in row:
            row["ratio"] = row["big"]["median_s"] / max(row["small"]["median_s"], 1e-9)
        out[name] = row
    return out


def format_result(dialect: str, r: Dict[str, Any]) -> str:
    """The table of one dialect (markdown)."""
    small, big = f"{r['small']:,}", f"{r['kept']:,}"

    def built(label: str) -> str:
        seconds = r["build_s"][label]
        return "reused" if seconds is None else f"{seconds:.1f} s"

    lines = [f"{dialect} ({r['server']}): kept runs {small} / {big} with {r['events']} events each; "
             f"build {built('small')} / {built('big')}; loads (1-min) "
             f"{r['load_min']}..{r['load_max']}",
             "",
             f"| prune | {small} kept | {big} kept | big / small | peak RSS growth (big) |",
             "|---|---:|---:|---:|---:|"]

    def fmt(seconds: float) -> str:
        return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"

    for name, row in r["summary"].items():
        lines.append(f"| {name} | {fmt(row['small']['median_s'])} | {fmt(row['big']['median_s'])} | "
                     f"{row['ratio']:.2f} | {row['big']['rss_growth_mb']:.1f} MB |")
    return "\n".join(lines)


@contextlib.contextmanager
def open_sides(args: argparse.Namespace, now: int) -> Iterator[Tuple[List[Side], str, List[int]]]:
    """(small, big) on the chosen dialect, the server's version, and the pids to renice."""
    server = None
    directory = None
    sides: List[Side] = []
    checkpoint: Optional[Callable[[str], Any]] = None
    try:
        if args.small_url or args.big_url:
            if not (args.small_url and args.big_url):
                raise SystemExit("--small-url and --big-url go together")
            urls = {"small": args.small_url, "big": args.big_url}
            pids: List[int] = [os.getpid()]
        elif args.dialect == "sqlite":
            if args.sqlite_dir:  # kept, for the next run to reuse
                os.makedirs(args.sqlite_dir, exist_ok=True)
                folder = args.sqlite_dir
                meta = os.path.join(folder, "built.json")
                if os.path.exists(meta):
                    with open(meta) as f:
                        now = json.load(f)["now"]  # the kept runs' ages are relative to it
                else:
                    with open(meta, "w") as f:
                        json.dump({"now": now}, f)
            else:
                folder = directory = tempfile.mkdtemp(prefix="bap-prune-kept-")
            urls = {label: f"sqlite:///{folder}/{label}.db" for label in ("small", "big")}
            pids = [os.getpid()]
        else:
            from tests.servers import start_mariadb, start_postgres
            _log(f"starting a throwaway {args.dialect} server ...")
            settings = dict(item.split("=", 1) for item in args.server_setting or ())
            server = (start_postgres if args.dialect == "postgres" else start_mariadb)(settings=settings)
            other = server.create_database("bap_prune_small")
            suffix = "?charset=utf8mb4" if args.dialect == "mysql" else ""
            urls = {"small": other.url + suffix, "big": server.url + suffix}
            pids = [os.getpid()] + ([server.pid] if server.pid else [])
            if args.dialect == "postgres":
                checkpoint = server.admin_execute  # CHECKPOINT needs a superuser
        sides = [Side("small", urls["small"], args.small, args.events, now, 1),
                 Side("big", urls["big"], args.kept, args.events, now, 2)]
        if checkpoint is not None:
            for side in sides:
                side.checkpoint = functools.partial(checkpoint, "CHECKPOINT")
        query = {"sqlite": "SELECT sqlite_version()", "postgres": "SHOW server_version",
                 "mysql": "SELECT VERSION()"}[sides[0].dialect]
        row = sides[0].database.execute_sql(query).fetchone()
        version = str(row[0]).split(" ")[0]
        name = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mysql": "MySQL/MariaDB"}[sides[0].dialect]
        yield sides, f"{name} {version}", pids
    finally:
        for side in sides:
            side.close()
        if server is not None:
            server.stop()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.prune_kept", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS, default="sqlite")
    parser.add_argument("--kept", type=int, default=1_000_000, help="kept runs in the big database")
    parser.add_argument("--small", type=int, default=10_000, help="kept runs in the small database")
    parser.add_argument("--events", type=int, default=10, help="events per kept run")
    parser.add_argument("--prune", type=int, action="append",
                        help="old runs to prune per timed call (repeatable; default 1000 and 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every case, interleaved")
    parser.add_argument("--repeat", type=int, default=3,
                        help="calls per round of the nothing-to-delete cases")
    parser.add_argument("--lock", metavar="PATH", help="flock PATH (exclusive) around every timed part")
    parser.add_argument("--timed-priority", type=int, metavar="NICE",
                        help="run the timed parts at this niceness (this process and its server)")
    parser.add_argument("--sqlite-dir", metavar="DIR",
                        help="SQLite: keep the two files in DIR, and reuse them when a run left them built")
    parser.add_argument("--server-setting", action="append", metavar="NAME=VALUE",
                        help="a throwaway server's setting (repeatable), e.g. innodb_buffer_pool_size=2G")
    parser.add_argument("--small-url", help="an existing empty database for the small side")
    parser.add_argument("--big-url", help="an existing empty database for the big side")
    parser.add_argument("--explain", type=int, metavar="P",
                        help="at the end, EXPLAIN every statement of a prune of P old runs on the big side")
    parser.add_argument("--baseline", metavar="REV",
                        help="time prune.py as it was at git REV too, interleaved (rows marked [REV])")
    parser.add_argument("--quick", action="store_true", help="one call per case (the CI smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    for name in ("kept", "small", "events", "rounds", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    prunes = args.prune or [1000, 10_000]
    if any("=" not in item for item in args.server_setting or ()):
        parser.error("--server-setting takes NAME=VALUE")
    result_settings = dict(item.split("=", 1) for item in args.server_setting or ())
    if args.quick:
        args.rounds, args.repeat = 1, 1
    now = int(time.time() * 1000)
    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; load {load1():.2f}")
    result: Dict[str, Any] = {"kept": args.kept, "small": args.small, "events": args.events, "prunes": prunes,
                              "rounds": args.rounds, "repeat": args.repeat, "priority": args.timed_priority,
                              "idle_priority": os.getpriority(os.PRIO_PROCESS, 0),
                              "server_settings": result_settings}
    with open_sides(args, now) as (sides, version, pids):
        result["server"] = version
        result["build_s"] = {}
        for side in sides:
            if args.sqlite_dir and side.count_runs() == side.kept:
                _log(f"{args.dialect}: the {side.label} side is built already ({args.sqlite_dir})")
                result["build_s"][side.label] = None
                continue
            _log(f"{args.dialect}: building {side.kept:,} kept runs ({side.kept * args.events:,} events) "
                 f"for the {side.label} side; load {load1():.2f}")
            result["build_s"][side.label] = side.build()
            t0 = time.perf_counter()
            side.analyze()
            result.setdefault("analyze_s", {})[side.label] = time.perf_counter() - t0
            _log(f"  built in {result['build_s'][side.label]:.1f} s, analyzed in "
                 f"{result['analyze_s'][side.label]:.1f} s; load {load1():.2f}")
        timing = Timing(args.lock, args.timed_priority, pids)
        implementations: List[Tuple[str, Callable[..., Any]]] = [("", prune_runs)]
        if args.baseline:
            implementations.append((f" [{args.baseline}]", baseline_prune(args.baseline)))
        measured = run(sides, prunes, args.rounds, args.repeat, timing, implementations)
        left = {side.label: side.count_runs() for side in sides}
        if left != {side.label: side.kept for side in sides}:
            raise AssertionError(f"runs left after the prunes: {left}, expected every kept one")
        result.update(measured)
        result["summary"] = summarise(measured["cases"])
        result["loads"] = [hold["load1"] for hold in timing.lock.holds]
        every = [load for pair in result["loads"] for load in pair]
        result["load_min"], result["load_max"] = min(every), max(every)
        result["locked_seconds"] = timing.lock.held_seconds
        if args.explain:
            result["explain"] = explain(sides[1], args.explain)
            for plan in result["explain"]:
                _log(plan["statement"] + "\n    " + "\n    ".join(plan["plan"]))
    print(format_result(args.dialect, result) + "\n", flush=True)
    path = write_results(args.json, f"prune-kept-{args.dialect}",
                         {"machine": info, "dialect": args.dialect, "result": result})
    _log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
