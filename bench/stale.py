"""W16: a dead worker's followers, and what the heartbeats cost.

1. **Kill to end.** `--kills` worker processes each track a run (the library's defaults:
   `heartbeat_interval` 10 s, followers' `stale_after` 40 s, unless given), emit three
   events and wait; this process follows each run with `resume`. Each worker is SIGKILLed
   at a random moment (after its first beat, then uniform over one heartbeat interval, so
   the kill lands anywhere between two beats), and the time from the kill to its follower's end
   (reason "stale") is recorded; a follower that ends before the kill (a live worker called
   stale: its beats came late, on a loaded machine) is counted and that kill measured again.
   The baseline is the old behaviour: the follower waited for the next `reap_stale` (cron),
   so it is printed as the cron interval, not measured.
2. **Heartbeat cost.** `--runs` tracked runs live in this process for `--seconds`: the
   heartbeat thread's UPDATE statements per second, next to what one UPDATE per run per
   interval (the per-run form) would send; and one beat round of all runs (batched, 500 per
   statement) timed against the same runs beaten one by one (`runs.heartbeat`), side by side.
3. **Liveness check cost.** The poller's liveness statements per second with `--runs`
   followers (one per run), from the poller's own counter.

Run: ``python -m bench.stale --dialect all [--kills 3] [--runs 1000] [--seconds 30]
[--lock /tmp/bench.lock] [--json PATH]``; ``--quick`` is the smoke run (short limits).
Only the timed round comparison (2) holds the benchmark lock: the rest mostly waits.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from better_agent_peewee import open_database, peewee_storage
from better_agent_peewee.followers import LIVENESS_PAUSE, STALE_AFTER
from better_agent_peewee.tracking import HEARTBEAT_INTERVAL

from .env import machine, open_target
from .quiet import BenchLock, load1

DIALECTS = ("sqlite", "postgres", "mysql")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The old way a follower of a dead worker ended: the next reap, at worst, with the documented
#: reap-only cron line (every 5 minutes, --reap-stale 10m).
CRON_BASELINE_S = 900.0
#: Seconds a worker's first heartbeat is waited for before its kill (FIRST_BEAT_LATEST when quiet).
FIRST_BEAT_WAIT = 60.0
#: Times a kill is measured again when its follower ended before it (see kill_to_end).
EARLY_RETRIES = 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker_main(url: str, run_id: str, beat: str, linger: str = "3600") -> None:
    """A worker process: track `run_id`, emit three events, say so, wait `linger` seconds to be killed."""
    storage = peewee_storage(open_database(url))
    with storage.runs.track(run_id, "agent", heartbeat_interval=float(beat)) as run:
        for i in range(3):
            run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": f"d{i}"})
        print("emitted", flush=True)
        time.sleep(float(linger))


def start_worker(url: str, run_id: str, beat: float, linger: float = 3600) -> subprocess.Popen[str]:
    """A `worker_main` process that has emitted its events (killed, and RuntimeError, if it did not)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from bench.stale import worker_main; "
                             "worker_main(*sys.argv[1:])", url, run_id, str(beat), str(linger)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "emitted\n":
        proc.kill()
        proc.wait(30)
        raise RuntimeError(f"worker {run_id} did not start: {line!r}")
    return proc


def first_beat(storage: Any, run_id: str, wait: float) -> bool:
    """Wait up to `wait` seconds until `run_id` has heartbeat once (``updatedAt`` past ``startedAt``)."""
    deadline = time.monotonic() + wait
    while True:
        run = storage.runs.get(run_id)
        if run is not None and run["updatedAt"] > run["startedAt"]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def kill_one(url: str, storage: Any, run_id: str, beat: float, stale_after: float,
             rng: random.Random) -> Dict[str, Any]:
    """Start a worker for `run_id`, follow it, SIGKILL it at a random moment: how its follower ended."""
    proc = start_worker(url, run_id, beat)
    try:
        follower = storage.streams.resume(run_id, stale_after=stale_after, timeout=stale_after * 4 + 60)
        killed: List[float] = []

        def kill() -> None:
            # After the first beat (a run killed before it is left to reap_stale), then anywhere
            # between two beats. The beat itself is waited for, not FIRST_BEAT_LATEST: on a
            # loaded machine the worker's first UPDATE can come later than that.
            if not first_beat(storage, run_id, FIRST_BEAT_WAIT):
                _log(f"worker {run_id}: no heartbeat in {FIRST_BEAT_WAIT:g} s; killed anyway")
            time.sleep(rng.uniform(0, beat))
            killed.append(time.monotonic())
            proc.kill()
        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        events = sum(1 for _ in follower)
        ended = time.monotonic()
        killer.join()
        return {"run": run_id, "reason": follower.reason, "events": events,
                "seconds": round(ended - killed[0], 3)}
    finally:
        proc.kill()
        proc.wait(30)


def kill_to_end(url: str, storage: Any, kills: int, beat: float, stale_after: float) -> List[Dict[str, Any]]:
    """Start `kills` workers, follow each, SIGKILL each at a random moment; seconds from kill to end.

    A follower that ended before its worker was killed (a live worker whose beats came late,
    on a loaded machine, called stale) is no kill-to-end time: it is counted (``early``) and
    that kill is measured again, up to EARLY_RETRIES times.
    """
    rng = random.Random()
    results: List[Dict[str, Any]] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            for attempt in range(EARLY_RETRIES + 1):
                result = kill_one(url, storage, f"doomed-{i}-{attempt}-{os.getpid()}", beat, stale_after, rng)
                if result["seconds"] > 0 or attempt == EARLY_RETRIES:
                    break
                _log(f"worker {result['run']}: its follower ended {result['reason']} "
                     f"{-result['seconds']:.1f} s before the kill (a late beat); measured again")
            with lock:
                results.append({**result, "early": attempt})
        except BaseException as exc:  # (re-raised below: a kill that failed is no missing row)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(kills)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def heartbeat_cost(storage: Any, runs: int, seconds: float, beat: float, stale_after: float,
                   lock: BenchLock) -> Dict[str, Any]:
    """Statements per second of the heartbeat thread for `runs` tracked runs, a timed batched
    round against one-by-one beats, and the liveness statements of `runs` followers."""
    tag = f"live-{os.getpid()}"
    tracked = [storage.runs.track(f"{tag}-{i:05d}", "agent", heartbeat_interval=beat).start()
               for i in range(runs)]
    beats = storage.runs.heartbeats
    with concurrent.futures.ThreadPoolExecutor(32) as pool:  # (each resume waits for its first poll)
        followers = list(pool.map(lambda run: storage.streams.resume(run.run_id, stale_after=stale_after),
                                  tracked))
    poller = storage.streams.poller()
    statements0, checks0 = beats.statements, poller.liveness_checks
    time.sleep(seconds)
    statements, checks = beats.statements - statements0, poller.liveness_checks - checks0
    for follower in followers:
        follower.close()
    ids = [run.run_id for run in tracked]
    batched: List[float] = []
    single: List[float] = []
    with lock.hold("heartbeat rounds"):
        load = load1()
        for _ in range(5):
            t0 = time.perf_counter()
            beats._beat(ids)
            batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for run_id in ids:
                storage.runs.heartbeat(run_id)
            single.append(time.perf_counter() - t0)
    for run in tracked:
        run.finish()
    return {"runs": runs, "seconds": seconds, "interval": beat,
            "statements_per_s": round(statements / seconds, 3),
            "per_run_form_per_s": round(runs / beat, 3),
            "round_batched_ms": round(statistics.median(batched) * 1000, 2),
            "round_one_by_one_ms": round(statistics.median(single) * 1000, 2),
            "liveness_statements_per_s": round(checks / seconds, 3), "load1_timed": load}


def run_dialect(dialect: str, args: argparse.Namespace, lock: BenchLock) -> Dict[str, Any]:
    with open_target(dialect, log=_log) as target:
        storage = target.storage
        _log(f"[{dialect}] {args.kills} workers killed (heartbeat {args.beat} s, "
             f"stale_after {args.stale_after} s)")
        load = load1()
        kills = kill_to_end(target.url, storage, args.kills, args.beat, args.stale_after)
        cost = heartbeat_cost(storage, args.runs, args.seconds, args.beat, args.stale_after, lock)
        return {"server": target.server_version, "kills": kills, "load1_kills": load, "cost": cost,
                "stale_after": args.stale_after}


def format_result(dialect: str, r: Dict[str, Any]) -> str:
    times = [k["seconds"] for k in r["kills"]]
    reasons = sorted({k["reason"] for k in r["kills"]})
    early = sum(k.get("early", 0) for k in r["kills"])
    c = r["cost"]
    pause = min(LIVENESS_PAUSE, r["stale_after"] / 4)  # (the poller's pause between checks)
    return "\n".join([
        f"## {dialect} ({r['server']})",
        "| measure | adapter | baseline | ratio |",
        "|---|---|---|---|",
        f"| SIGKILL to follower end, s (median; min-max; n={len(times)}; reasons {', '.join(reasons)}; "
        f"live workers called stale and measured again: {early}) | "
        f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f}) | "
        f"next cron reap (--reap-stale 10m every 5 min): up to "
        f"{CRON_BASELINE_S:.0f} | {statistics.median(times) / CRON_BASELINE_S:.2f} |",
        f"| heartbeat statements/s, {c['runs']} live runs in one process ({c['seconds']:.0f} s, "
        f"interval {c['interval']:g} s) | {c['statements_per_s']:.2f} | one UPDATE per run per interval: "
        f"{c['per_run_form_per_s']:.1f} | {c['statements_per_s'] / c['per_run_form_per_s']:.4f} |",
        f"| one beat round of {c['runs']} runs, ms (median of 5) | {c['round_batched_ms']:.1f} | one by one: "
        f"{c['round_one_by_one_ms']:.1f} | {c['round_batched_ms'] / c['round_one_by_one_ms']:.3f} |",
        f"| liveness statements/s, {c['runs']} followers | {c['liveness_statements_per_s']:.2f} | "
        f"one per follower per check: {c['runs'] / pause:.1f} | "
        f"{c['liveness_statements_per_s'] / (c['runs'] / pause):.4f} |",
    ])


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.stale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS + ("all",), default="sqlite")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--beat", type=float, default=HEARTBEAT_INTERVAL, help="heartbeat_interval, s")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER, help="followers' stale_after, s")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: short limits, few runs")
    parser.add_argument("--lock", metavar="PATH", help="flock this file around the timed rounds")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        # stale_after 2 s: four times the shortest real beat interval (heartbeats.MIN_PAUSE, 0.5 s),
        # as the defaults' 40 s are of 10 s, so that a loaded machine's late beat is not "stale".
        args.kills, args.beat, args.stale_after, args.runs, args.seconds = 2, 0.2, 2.0, 20, 2.0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores; load {load1():.2f}")
    lock = BenchLock(args.lock)
    results = {}
    for dialect in DIALECTS if args.dialect == "all" else (args.dialect,):
        results[dialect] = run_dialect(dialect, args, lock)
        print(format_result(dialect, results[dialect]) + "\n", flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or os.path.join(RESULTS, f"{stamp}-w16-{args.dialect}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"generated": stamp, "machine": info, "quick": args.quick, "beat": args.beat,
                   "stale_after": args.stale_after, "dialects": results, "lock_holds": lock.holds},
                  f, indent=1)
    _log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
