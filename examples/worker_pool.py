"""Workers in a thread pool executing runs, streaming their events, and stopping when asked.

    python examples/worker_pool.py                    # ./agent.db
    DATABASE_URL=mysql://app:secret@localhost/app python examples/worker_pool.py
    python examples/worker_pool.py --runs 20 --workers 8 --steps 10

The dispatcher (the main thread, standing in for your API) starts each run when it
accepts it (`storage.runs.track(...).start()`: the `running` record, the stream and its
RUN_STARTED) and queues it; a `ThreadPoolExecutor` of workers executes the queued runs,
each inside ``with run:``, which records how the run ended. Before each step a worker
calls `run.check_abort()`, which raises `RunAborted` once an abort was requested: the
block then records the run as `aborted` (RUN_ERROR, code ABORTED) and the worker moves
on. Here two runs are aborted: the last one while it still waits in the queue (its
worker stops before its first step), and the first one while it is in progress (it
stops between two steps).

The database is pooled (`open_database(url, pooled=True)`: `playhouse.pool`), with one
connection per worker plus one for the dispatcher. A worker gives its connection back
to the pool when a run is done (`db.close()`), so a pool thread that sits idle holds none.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from playhouse.pool import PooledDatabase

from better_agent_peewee import TrackedRun, create_tables, open_database, peewee_storage
from better_agent_peewee.database_url import redact


def execute_run(db: Any, run: TrackedRun, steps: int, step_seconds: float) -> Dict[str, Any]:
    """What a worker does with one run: its steps, streamed, checking for an abort before each."""
    done = 0
    try:
        with run:  # completed; failed on an exception (which propagates); aborted on RunAborted (quietly)
            for step in range(steps):
                run.check_abort()  # RunAborted once an abort was requested
                time.sleep(step_seconds)  # the work of one step: a model call, a tool call ...
                run.emit({"type": "STEP_FINISHED", "stepName": f"step-{step + 1}"})
                done += 1
    finally:
        db.close()  # give this thread's connection back to the pool
    return {"runId": run.run_id, "steps": done, "worker": threading.current_thread().name}


def wait_for_event(storage: Any, run_id: str, seq: int, timeout: float = 30) -> Optional[Dict[str, Any]]:
    """Follow the stream of `run_id` until event `seq` arrives (None if it never does)."""
    event: Dict[str, Any]
    for event in storage.streams.resume(run_id, seq - 1, timeout=timeout):
        return event
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database", nargs="?", help="SQLite file or database URL "
                        "(default: $DATABASE_URL, else ./agent.db)")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=0.02)
    args = parser.parse_args(argv)
    if args.runs < 2 or args.workers < 1 or args.steps < 3:
        parser.error("need at least 2 runs, 1 worker and 3 steps")

    url = args.database or os.environ.get("DATABASE_URL") or "sqlite:///agent.db"
    if "://" not in url:
        url = f"sqlite:///{url}"
    db = open_database(url, pooled=True, max_connections=args.workers + 2)
    create_tables(db)
    storage = peewee_storage(db)

    batch = uuid.uuid4().hex[:8]
    run_ids = [f"run-{batch}-{i + 1}" for i in range(args.runs)]
    queued, in_progress = run_ids[-1], run_ids[0]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="worker") as pool:
        futures = []
        for run_id in run_ids:
            run = storage.runs.track(run_id, "worker-demo", config={"steps": args.steps},
                                     abort_check_interval=0)  # steps are slow: read the stamp before each
            run.start()  # running, followable and abortable from now on
            if run_id == queued:
                # Cancelled by its user while it waits in the queue: its worker stops before step 1.
                storage.runs.request_abort(run_id)
            futures.append(pool.submit(execute_run, db, run, args.steps, args.step_seconds))
        # The first run is in progress once its first step is streamed: asked now, it stops at
        # its next check (or, if its last step is already done, completes: then this is False).
        wait_for_event(storage, in_progress, seq=2)
        storage.runs.request_abort(in_progress)
        results = [future.result() for future in futures]
    elapsed = time.monotonic() - started

    print(f"database: {redact(url)} ({storage.dialect.name}, {type(db).__name__})")
    print(f"{len(run_ids)} runs on {args.workers} workers in {elapsed:.2f}s")
    for result in results:
        run = storage.runs.get(result["runId"])
        assert run is not None
        events = storage.list("streamEvents", {"where": {"runId": run["runId"]}})["items"]
        final = run.get("finalEvent", {})
        print(f"  {run['runId']:<22} {run['status']:<10} {result['steps']}/{args.steps} steps, "
              f"{len(events):>2} events, {result['worker']:<10} {final.get('message', '')}".rstrip())
    if isinstance(db, PooledDatabase):
        db.close_all()  # the idle connections in the pool
    return 0


if __name__ == "__main__":
    sys.exit(main())
