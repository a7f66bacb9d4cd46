"""W12 and W13: many followers (`storage.streams.resume`) in one process.

| W   | job                                                                                   |
|-----|---------------------------------------------------------------------------------------|
| W12 | 1,000 idle followers (one per open stream, nothing appended) for 30 s: client CPU,     |
|     | database server CPU (% of one core) and connections held                               |
| W9  | (again, with those 1,000 idle followers alongside) append-to-receipt latency of a live |
|     | stream, the writer in this process and in another one                                  |
| W13 | 100 live streams appended at 20 events/s each by other threads, 10 followers each:     |
|     | every follower gets every event in order; CPU per delivered event                      |

CPU is read from /proc: this process's own (followers, poller, and in W13 the writers too)
and, for a server this run started, the server's processes. A server given by URL is not
ours to measure: its CPU is left out (said in the row's note).
"""
from __future__ import annotations

import gc
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .harness import Row

#: W12: followers, idle seconds; W13: streams, followers per stream, events per second per stream, seconds.
FULL = {"idle_followers": 1000, "idle_seconds": 30.0, "latency_events": 200, "live_streams": 100,
        "followers_per_stream": 10, "rate": 20.0, "live_seconds": 15.0}
QUICK = {"idle_followers": 50, "idle_seconds": 1.0, "latency_events": 10, "live_streams": 5,
         "followers_per_stream": 3, "rate": 20.0, "live_seconds": 1.0}

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu() -> float:
    """CPU seconds (user + system) this process has used, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu(server: Any) -> Optional[float]:
    """CPU seconds used so far by a server this run started (PostgreSQL: the postmaster and its
    children, the sessions); None for a server we do not own."""
    pid = getattr(server, "pid", None)
    if server is None or pid is None or not getattr(server, "managed", False):
        return None
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] is ppid; [11], [12] utime, stime; [13], [14] the reaped children's
        if int(entry) == pid or int(fields[1]) == pid:
            total += sum(int(x) for x in fields[11:15])
    return total / _TICK


def held_connections(target: Any) -> int:
    """Connections to the database, not counting the one asking (SQLite: this process's open ones)."""
    if target.dialect == "sqlite":
        # Not the file's descriptors: SQLite's unix VFS keeps the descriptor of a CLOSED connection
        # open while the process holds a lock on the file (in WAL mode an open connection holds a
        # read lock even when idle), since closing it would drop the process's POSIX locks; it
        # reuses or closes them later. Those are no connections: count the open ones instead.
        return sum(1 for c in gc.get_objects() if isinstance(c, sqlite3.Connection) and _is_open(c)
                   and c is not target.raw)
    raw = target.raw
    if target.dialect == "postgres":
        sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
               "AND pid <> pg_backend_pid()")
    else:
        sql = ("SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE() "
               "AND id <> CONNECTION_ID()")
    cursor = raw.cursor()
    cursor.execute(sql)
    return int(cursor.fetchone()[0])


def _is_open(conn: sqlite3.Connection) -> bool:
    try:
        return conn.in_transaction or True  # (raises on a closed connection; no other effect)
    except sqlite3.ProgrammingError:
        return False


def sqlite_file_descriptors(target: Any) -> int:
    """Descriptors of this process open on the SQLite file (open connections, and closed ones'
    that SQLite keeps while the file is locked), the benchmark's own raw connection included."""
    path = os.path.realpath(target.sqlite_path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                count += 1
        except OSError:
            pass
    return count


class Crowd:
    """`count` followers, one thread each, on streams of their own that nothing is appended to."""

    def __init__(self, storage: Any, prefix: str, count: int) -> None:
        self.storage = storage
        self.runs = [f"{prefix}-{i}" for i in range(count)]
        for run_id in self.runs:
            storage.streams.open(run_id)
        storage.database.close()
        self.errors: List[BaseException] = []
        self.started = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._follow, args=(run_id,), daemon=True)
                        for run_id in self.runs]
        old = threading.stack_size(256 * 1024)
        try:
            for t in self.threads:
                t.start()
        finally:
            threading.stack_size(old)
        for _ in self.threads:
            self.started.acquire(timeout=120)

    def _follow(self, run_id: str) -> None:
        try:
            follower = self.storage.streams.resume(run_id)  # the defaults: a web app's follower
            self.started.release()
            for _ in follower:
                pass
        except BaseException as exc:
            self.errors.append(exc)
            self.started.release()

    def close(self) -> None:
        for run_id in self.runs:
            self.storage.streams.close(run_id)
        self.storage.database.close()
        for t in self.threads:
            t.join(60)
        if self.errors:
            raise self.errors[0]


def w12_idle(w: Any, quick: bool) -> List[Row]:
    """W12, then W9 with the idle crowd still there."""
    p = QUICK if quick else FULL
    target, storage = w.target, w.storage
    n, seconds = p["idle_followers"], p["idle_seconds"]
    crowd = Crowd(storage, f"w12-{next(w.counter)}", n)
    rows: List[Row] = []
    try:
        time.sleep(min(2.0, seconds))  # settle: every follower past its first poll
        connections = held_connections(target)
        descriptors = sqlite_file_descriptors(target) if target.dialect == "sqlite" else None
        c0, s0, t0 = process_cpu(), server_cpu(target.server), time.perf_counter()
        time.sleep(seconds)
        c1, s1, t1 = process_cpu(), server_cpu(target.server), time.perf_counter()
        wall = t1 - t0
        client = 100 * (c1 - c0) / wall
        server = None if s0 is None or s1 is None else 100 * (s1 - s0) / wall
        total = client + (server or 0.0)
        details = {"followers": n, "seconds": wall, "connections": connections,
                   "sqlite_file_descriptors": descriptors}
        note = ("" if server is not None or target.dialect == "sqlite"
                else "server CPU not measured (not ours)")
        rows.append(Row("W12", f"{n:,} idle followers: client CPU", client, None, "% core", None, "(info)",
                        None, "", details))
        if server is not None:
            rows.append(Row("W12", f"{n:,} idle followers: server CPU", server, None, "% core", None,
                            "(info)", None, "", details))
        rows.append(Row("W12", f"{n:,} idle followers: CPU, client + server", total, None, "% core", None,
                        "<= 10", total <= 10, note, details))
        rows.append(Row("W12", f"{n:,} idle followers: connections held", float(connections), None, "conns",
                        None, "<= 2", connections <= 2, "", details))
        count = p["latency_events"]
        same = _latency_same_process(storage, f"w9i-{next(w.counter)}", count)
        rows.extend(_latency_rows("this process", same, 2.0, n))
        other = _latency_other_process(target, storage, f"w9o-{next(w.counter)}", count)
        limit = 5.0 if target.dialect == "postgres" else 25.0 + 5.0  # NOTIFY; else the 25 ms poll interval
        rows.extend(_latency_rows("another process", other, limit, n))
    finally:
        crowd.close()
    return rows


def _latency_rows(where: str, latencies: List[float], p50_limit: float, crowd: int) -> List[Row]:
    latencies = sorted(latencies)
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))] * 1000
    details = {"events": len(latencies), "idle_followers": crowd, "max_ms": latencies[-1] * 1000}
    return [Row("W9", f"latency p50, writer in {where}, {crowd:,} idle followers alongside", p50, None, "ms",
                None, f"<= {p50_limit:g} ms", p50 <= p50_limit, "", details),
            Row("W9", f"latency p99, writer in {where}, {crowd:,} idle followers alongside", p99, None, "ms",
                None, "(info)", None, "", details)]


def _collect(storage: Any, run_id: str, count: int) -> Tuple[threading.Thread, List[float],
                                                             List[BaseException]]:
    got: List[float] = []
    errors: List[BaseException] = []
    ready = threading.Event()

    def follow() -> None:
        try:
            follower = storage.streams.resume(run_id, timeout=count * 0.1 + 120)
            ready.set()
            for ev in follower:
                got.append(time.time() - ev["sentAt"])
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=follow)
    thread.start()
    ready.wait(60)
    return thread, got, errors


def _latency_same_process(storage: Any, run_id: str, count: int) -> List[float]:
    import random
    storage.streams.open(run_id)
    thread, got, errors = _collect(storage, run_id, count)
    rng = random.Random(9)
    for i in range(count):
        time.sleep(rng.uniform(0.005, 0.045))
        storage.streams.append(run_id, {"type": "CUSTOM", "i": i, "sentAt": time.time()})
    storage.streams.close(run_id)
    storage.database.close()
    thread.join(120)
    if errors:
        raise errors[0]
    if len(got) != count:
        raise AssertionError(f"W9: received {len(got)} of {count} events")
    return got


_WRITER = """
import random, sys, time
from better_agent_peewee import peewee_storage
from better_agent_peewee.cli import open_database
storage = peewee_storage(open_database(sys.argv[1]))
run_id, count = sys.argv[2], int(sys.argv[3])
rng = random.Random(9)
storage.streams.append(run_id, {"type": "WARMUP", "sentAt": time.time()})  # connect before timing
for i in range(count):
    time.sleep(rng.uniform(0.005, 0.045))
    storage.streams.append(run_id, {"type": "CUSTOM", "i": i, "sentAt": time.time()})
storage.streams.close(run_id)
"""


def _latency_other_process(target: Any, storage: Any, run_id: str, count: int) -> List[float]:
    storage.streams.open(run_id)
    thread, got, errors = _collect(storage, run_id, count + 1)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", _WRITER, target.url, run_id, str(count)], check=True, env=env,
                   timeout=count * 0.1 + 120)
    thread.join(120)
    if errors:
        raise errors[0]
    if len(got) != count + 1:
        raise AssertionError(f"W9: received {len(got)} of {count + 1} events")
    return got[1:]


def w13_live(w: Any, quick: bool) -> List[Row]:
    """W13: live streams, several followers each; every follower must get every event in order."""
    p = QUICK if quick else FULL
    target, storage = w.target, w.storage
    streams, per, rate, seconds = p["live_streams"], p["followers_per_stream"], p["rate"], p["live_seconds"]
    prefix = f"w13-{next(w.counter)}"
    runs = [f"{prefix}-{i}" for i in range(streams)]
    for run_id in runs:
        storage.streams.open(run_id)
    storage.database.close()
    received: Dict[Tuple[str, int], List[int]] = {}
    errors: List[BaseException] = []
    started = threading.Semaphore(0)

    def follow(run_id: str, k: int) -> None:
        seqs = received[(run_id, k)] = []
        try:
            follower = storage.streams.resume(run_id)
            started.release()
            for ev in follower:
                seqs.append(ev["seq"])
        except BaseException as exc:
            errors.append(exc)
            started.release()

    followers = [threading.Thread(target=follow, args=(run_id, k), daemon=True)
                 for run_id in runs for k in range(per)]
    old = threading.stack_size(256 * 1024)
    try:
        for t in followers:
            t.start()
    finally:
        threading.stack_size(old)
    for _ in followers:
        started.acquire(timeout=120)

    writers_count = min(10, streams)
    appended = [0] * writers_count

    def write(index: int) -> None:
        mine = runs[index::writers_count]
        gap = 1.0 / (rate * len(mine))  # each of its streams gets `rate` events a second
        deadline = time.perf_counter() + seconds
        next_at = time.perf_counter()
        i = 0
        try:
            while time.perf_counter() < deadline:
                storage.streams.append(mine[i % len(mine)],
                                       {"type": "TEXT_MESSAGE_CONTENT", "delta": "tok", "i": i})
                appended[index] += 1
                i += 1
                next_at += gap
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
        except BaseException as exc:
            errors.append(exc)
        finally:
            storage.database.close()

    writers = [threading.Thread(target=write, args=(i,)) for i in range(writers_count)]
    c0, s0, t0 = process_cpu(), server_cpu(target.server), time.perf_counter()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    for run_id in runs:
        storage.streams.close(run_id)
    storage.database.close()
    for t in followers:
        t.join(120)
    c1, s1, t1 = process_cpu(), server_cpu(target.server), time.perf_counter()
    if errors:
        raise errors[0]
    count_sql = w.raw.sql("SELECT COUNT(*) FROM stream_events WHERE run_id = ?")
    expected = {run_id: int(w.raw.execute(count_sql, (run_id,)).fetchone()[0]) for run_id in runs}
    for (run_id, _k), seqs in received.items():
        if seqs != list(range(1, expected[run_id] + 1)):
            raise AssertionError(f"W13: a follower of {run_id} got {len(seqs)} events, "
                                 f"not 1..{expected[run_id]} in order")
    delivered = sum(len(s) for s in received.values())
    client = c1 - c0
    server = None if s0 is None or s1 is None else s1 - s0
    cpu = client + (server or 0.0)
    details = {"streams": streams, "followers": streams * per, "appended": sum(appended),
               "delivered": delivered, "seconds": t1 - t0, "client_cpu_s": client, "server_cpu_s": server}
    note = "" if server is not None or target.dialect == "sqlite" else "server CPU not measured (not ours)"
    return [Row("W13", f"{streams} live streams x {per} followers: events delivered, all in order",
                float(delivered), None, "events", None, "(info)", None, "", details),
            Row("W13", "CPU per delivered event (client + server, appends included)", 1e6 * cpu / delivered,
                None, "us", None, "(info)", None, note, details)]
