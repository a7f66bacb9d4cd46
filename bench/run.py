"""The runner: ``python -m bench --dialect sqlite|postgres|mysql|all [--quick] [--rounds N] [--json PATH]``.

For each dialect: start a throwaway server (as the tests do; or use ``BAP_BENCH_POSTGRES_URL`` /
``BAP_BENCH_MYSQL_URL``, whose five tables are DROPPED and recreated), bulk-load the data, run
W1-W10, print the table, and at the end write every row plus the machine to JSON under
``bench/results/``. Servers started here are stopped by pid on the way out, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from better_agent_peewee.schema import drop_performance_indexes

from .env import machine, open_target
from .harness import LEGEND, Row, Settings, format_table, missing_row
from .workloads import Sizes, Workloads

DIALECTS = ("sqlite", "postgres", "mysql")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_dialect(dialect: str, settings: Settings, sizes: Sizes, log: Callable[[str], None] = _log,
                only: Optional[List[str]] = None, shared_schema_only: bool = False) -> Dict[str, Any]:
    """Every workload on one dialect: ``{"server": version, "rows": [Row, ...], ...}``."""
    from . import followers, prune_memory

    started = time.perf_counter()
    with open_target(dialect, log) as target:
        if shared_schema_only:  # adapter and baseline share the tables: both lose the indexes
            log(f"{dialect}: without our performance indexes: "
                f"{', '.join(drop_performance_indexes(target.database))}")
        w = Workloads(target, settings, sizes, log)
        log(f"{dialect}: {target.server_version}; loading data ...")
        loaded = w.build_data()
        log(f"  data loaded in {sum(loaded.values()):.1f}s "
            f"({', '.join(f'{k} {v:.1f}s' for k, v in loaded.items())})")
        rows: List[Row] = []
        steps = [("W1", w.w1_set), ("W2", w.w2_get), ("W3", w.w3_latest), ("W4", w.w4_append),
                 ("W5", w.w5_list), ("W6", w.w6_append), ("W7", w.w7_append_many), ("W8", w.w8_poll),
                 ("W9", w.w9_latency), ("W10", lambda: prune_memory.measure(w)),
                 ("W12", lambda: followers.w12_idle(w, settings.quick)),
                 ("W13", lambda: followers.w13_live(w, settings.quick))]
        for name, step in steps:
            if only and name not in only:
                continue
            w.fresh_connections()
            t0 = time.perf_counter()
            try:
                got = step()
            except Exception as exc:  # one broken workload must not hide the others' numbers
                log(f"  {name} FAILED: {exc!r}\n{traceback.format_exc()}")
                got = missing_row(name, "failed",
                                  f"error: {str(exc).splitlines()[0][:120] if str(exc) else repr(exc)}")
            new = got if isinstance(got, list) else [got]
            rows.extend(new)
            for r in new:
                shown = "n/a" if r.adapter is None else (f"{r.ratio:.2f}x" if r.ratio is not None else
                                                         f"{r.adapter:.1f} {r.unit}")
                log(f"  {r.workload} {r.title}: {shown}{' ' + r.note if r.note else ''} "
                    f"({time.perf_counter() - t0:.1f}s)")
        return {"server": target.server_version, "settings": target.settings,
                "seconds": time.perf_counter() - started,
                "load_seconds": loaded, "rows": rows}


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point; returns the exit code (0 even with MISSes: this is not a test)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=DIALECTS + ("all",), default="sqlite")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (small data, 2 rounds)")
    parser.add_argument("--rounds", type=int,
                        help="interleaved A/B rounds per workload (default 15, quick 2)")
    parser.add_argument("--json", metavar="PATH", help="write the results here (default: bench/results/...)")
    parser.add_argument("--only", metavar="W", action="append",
                        help="run only this workload (W1 ... W10, W12, W13); repeatable")
    parser.add_argument("--shared-schema-only", action="store_true",
                        help="drop our performance indexes first (the shared schema alone, for before/after)")
    args = parser.parse_args(argv)

    settings = Settings(quick=args.quick)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.quick:
        settings.rounds, settings.batch_seconds, settings.min_ops = 2, 0.01, 3
    if args.rounds:
        settings.rounds = max(1, args.rounds)
    dialects = DIALECTS if args.dialect == "all" else (args.dialect,)

    # SIGTERM behaves like Ctrl-C, so the servers we started are stopped on the way out.
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)

    info = machine()
    _log(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; "
         + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    started = time.perf_counter()
    results: Dict[str, Any] = {}
    try:
        for dialect in dialects:
            results[dialect] = run_dialect(dialect, settings, sizes, only=args.only,
                                           shared_schema_only=args.shared_schema_only)
            print(format_table(f"{dialect} ({results[dialect]['server']})", results[dialect]["rows"]),
                  flush=True)
            print(flush=True)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    total = time.perf_counter() - started

    misses = [(d, r) for d, res in results.items() for r in res["rows"] if r.passed is False]
    failed = [(d, r) for d, res in results.items() for r in res["rows"] if r.adapter is None]
    print(LEGEND, flush=True)
    print(f"{len(misses)} MISS, {len(failed)} not measured; {total:.0f}s in all", flush=True)

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or os.path.join(RESULTS, f"{stamp}-{args.dialect}{'-quick' if args.quick else ''}.json")
    document = {
        "generated": stamp, "quick": args.quick, "rounds": settings.rounds,
        "batch_seconds": settings.batch_seconds, "sizes": {k: v for k, v in vars(sizes).items()},
        "machine": info, "seconds": total,
        "dialects": {d: {"server": res["server"], "settings": res["settings"], "seconds": res["seconds"],
                         "load_seconds": res["load_seconds"],
                         "rows": [r.as_json() for r in res["rows"]]} for d, res in results.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    _log(f"results written to {path}")
    return 0
