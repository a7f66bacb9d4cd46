"""W10: ``runs.prune`` of 100,000 finished runs with 1,000,000 stream events -- time and peak RSS.

The data is bulk-loaded by the benchmark process; the prune itself runs in a fresh
subprocess (``python -m bench.prune_memory URL``) so that its resident memory is measured
from a clean start: RSS right before the prune call, and the peak during it (the kernel's
high-water mark, reset just before the call, cross-checked by a 5 ms sampler thread).
"""
from __future__ import annotations

import datetime as dt
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .baseline import EVENT_COLUMNS, RUN_COLUMNS
from .harness import Row
from .workloads import Workloads, event, finished_run, now_ms

DAY_MS = 86_400_000
#: The pruned data finished 30 days ago; prune keeps 7 days.
AGE_DAYS, KEEP_DAYS = 30, 7
#: Recent runs that must survive the prune.
RECENT_RUNS = 100


def build(w: Workloads) -> Dict[str, Any]:
    """Replace the runs / streams / events data with W10's: N old finished runs, 10 events each."""
    raw, sizes = w.raw, w.sizes
    for table in ("stream_events", "streams", "agent_runs"):
        raw.execute(f"DELETE FROM {table}" if raw.dialect == "sqlite" else f"TRUNCATE TABLE {table}")
    start = time.perf_counter()
    old = now_ms() - AGE_DAYS * DAY_MS
    statuses = ("completed", "failed", "aborted")

    def runs() -> Iterator[Tuple[Any, ...]]:
        for i in range(sizes.prune_runs):
            run_id = f"prune-{i:07d}"
            yield raw.run_row(run_id,
                              finished_run(run_id, f"thread-{i % 1000:04d}", old + i, statuses[i % 3]))
        for i in range(RECENT_RUNS):  # finished a minute ago: kept
            run_id = f"recent-{i:04d}"
            yield raw.run_row(run_id, finished_run(run_id, "thread-recent", now_ms() - 60_000))

    def ids() -> Iterator[str]:
        yield from (f"prune-{i:07d}" for i in range(sizes.prune_runs))
        yield from (f"recent-{i:04d}" for i in range(RECENT_RUNS))

    def streams() -> Iterator[Tuple[Any, ...]]:
        for run_id in ids():
            stamp = raw.ts_in(old if run_id.startswith("prune") else now_ms() - 60_000)
            yield (run_id, run_id, "closed", stamp, stamp, stamp)

    per = sizes.prune_events_per_run

    def events() -> Iterator[Tuple[Any, ...]]:
        for n, run_id in enumerate(ids()):
            for seq in range(1, per + 1):
                yield raw.event_row(run_id, seq, old + n, event(seq))

    raw.bulk_load("agent_runs", RUN_COLUMNS, runs())
    raw.bulk_load("streams", ("id", "run_id", "status", "created_at", "updated_at", "closed_at"), streams())
    loaded = raw.bulk_load("stream_events", EVENT_COLUMNS, events(), chunk=10_000)
    if raw.dialect == "postgres":
        raw.execute("ANALYZE")  # fresh statistics, as autovacuum would have them on a live database
    return {"load_seconds": time.perf_counter() - start, "events_loaded": loaded}


def measure(w: Workloads) -> List[Row]:
    """Build W10's data, prune it in a subprocess, and return the time and memory rows."""
    sizes = w.sizes
    built = build(w)
    w.log(f"  W10 data: {sizes.prune_runs:,} runs, {built['events_loaded']:,} events "
          f"loaded in {built['load_seconds']:.1f}s; pruning in a subprocess ...")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.prune_memory", w.target.url], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"W10 prune subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report = result["report"]
    expected = {"runs": sizes.prune_runs, "streams": sizes.prune_runs,
                "events": sizes.prune_runs * sizes.prune_events_per_run}
    wrong = {k: (report.get(k), v) for k, v in expected.items() if report.get(k) != v}
    raw = w.raw
    left = raw.execute("SELECT COUNT(*) FROM agent_runs").fetchone()[0]
    if wrong or left != RECENT_RUNS:
        raise AssertionError(f"W10: prune deleted {wrong} (got, expected); {left} runs left, "
                             f"expected {RECENT_RUNS}")
    details = dict(result, **built)
    events = sizes.prune_runs * sizes.prune_events_per_run
    what = f"{sizes.prune_runs:,} runs + {events:,} events"
    limit_s = 60.0 * events / 1_000_000  # the 60 s for 1,000,000 events, scaled for --quick
    time_target = f"<= {limit_s:g} s" if w.target.dialect == "sqlite" else "(info)"
    seconds = result["seconds"]
    growth = result["rss_growth_mb"]
    return [
        Row("W10", f"runs.prune {what}: time", seconds, None, "s", None, time_target,
            seconds <= limit_s if w.target.dialect == "sqlite" else None, "", details),
        Row("W10", f"runs.prune {what}: peak RSS growth", growth, None, "MB", None, "<= 100 MB",
            growth <= 100, "", details),
    ]


# -- the subprocess -----------------------------------------------------------------------

def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prune_in_this_process(url: str) -> Dict[str, Any]:
    from playhouse.db_url import connect

    from better_agent_peewee import peewee_storage
    from better_agent_peewee.prune import prune_runs

    database = connect(url)
    storage = peewee_storage(database)
    storage.get("runs", "warm-up")  # the connection and its buffers belong to the baseline
    prune = getattr(storage.runs, "prune", None)
    older_than = dt.timedelta(days=KEEP_DAYS)
    gc.collect()

    peak_sampled = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = _status_kb("VmRSS") or 0
            if rss > peak_sampled[0]:
                peak_sampled[0] = rss
            done.wait(0.005)

    before = _status_kb("VmRSS") or 0
    reset = _reset_peak()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = prune(older_than) if prune is not None else prune_runs(storage, older_than)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    hwm = _status_kb("VmHWM") if reset else None
    peak = max(peak_sampled[0], hwm or 0)
    database.close()
    return {"seconds": seconds, "rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024,
            "rss_growth_mb": max(0, peak - before) / 1024, "peak_from": "VmHWM" if hwm else "sampler",
            "via": "storage.runs.prune" if prune is not None else "prune.prune_runs",
            "report": {k: getattr(report, k) for k in ("runs", "streams", "events", "batches")}}


if __name__ == "__main__":
    print(json.dumps(_prune_in_this_process(sys.argv[1])))
