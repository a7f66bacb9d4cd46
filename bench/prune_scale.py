"""How long `prune` takes, and how much memory, on 100,000 finished runs with 1,000,000 events.

    python bench/prune_scale.py --dialect sqlite
    python bench/prune_scale.py --dialect postgres          # starts a throwaway server (tests/servers.py)
    python bench/prune_scale.py --database postgresql://u:pw@host/db   # an existing, EMPTY database
    python bench/prune_scale.py --dialect sqlite --runs 10000 --events 10 --batch-size 500

It builds the data (every run finished 30 days ago, with its stream and N events, plus a
thread with messages that must survive), then runs the command a cron job runs,
``python -m better_agent_peewee prune --older-than 7d``, first with ``--dry-run`` and then
for real, each in a child process, and reports the child's wall time and peak RSS
(``os.wait4`` -> ``ru_maxrss``) next to the RSS of a child that only imports the package and
connects (the baseline). Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from better_agent_peewee import create_tables, open_database, peewee_storage  # noqa: E402

DAY = 86_400_000


def bulk_insert(storage: Any, model: Any, rows: List[Dict[str, Any]], chunk: int = 1000) -> None:
    """Multi-row INSERTs with values encoded by the model's own fields (peewee's insert_many
    spends ~40 ms compiling every 1,000 rows; this makes large data sets quick to build)."""
    if not rows:
        return
    db = storage.database
    names = list(rows[0])
    fields = [model._meta.fields[name] for name in names]
    first = [tuple(rows[0][name] for name in names)]
    one, _ = db.get_sql_context().sql(model.insert_many(first, fields=fields).returning()).query()
    head = one[:one.index(" VALUES ") + len(" VALUES ")]
    group = "(" + ", ".join([db.param] * len(fields)) + ")"
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        params = [f.db_value(row[name]) for row in part for name, f in zip(names, fields)]
        db.execute_sql(head + ", ".join([group] * len(part)), params)


def build(storage: Any, runs: int, events: int, step: int = 5000) -> None:
    """`runs` finished runs (30 days old), each with a stream and `events` events."""
    m = storage.models
    now = int(time.time() * 1000)
    statuses = ("completed", "failed", "aborted")
    for start in range(0, runs, step):
        ids = [f"run-{i:07d}" for i in range(start, min(start + step, runs))]
        finished = now - 30 * DAY
        with storage.transaction():
            bulk_insert(storage, m.run, [
                {"run_id": r, "agent_name": "bench", "status": statuses[i % 3], "config": {"model": "x"},
                 "started_at": finished - 60_000, "updated_at": finished, "finished_at": finished,
                 "final_event": {"type": "RUN_FINISHED"} if i % 3 == 0 else {"type": "RUN_ERROR",
                                                                             "message": "x"}}
                for i, r in enumerate(ids, start)])
            bulk_insert(storage, m.stream, [
                {"id": r, "run_id": r, "status": "closed", "created_at": finished - 60_000,
                 "updated_at": finished, "closed_at": finished} for r in ids])
            bulk_insert(storage, m.stream_event, [
                {"id": f"{r}:{seq}", "run_id": r, "seq": seq, "timestamp": finished - 60_000 + seq,
                 "event": {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "token " * 8}}
                for r in ids for seq in range(1, events + 1)])
    storage.memory.threads.set("t1", {"id": "t1", "agentName": "bench", "createdAt": now - 40 * DAY,
                                      "updatedAt": now - 40 * DAY})
    storage.memory.messages.append("t1",
                                   [{"id": f"m{i}", "role": "user", "content": "hi"} for i in range(10)],
                                   run_id="run-0000000")


# Runs the command line in the child and reports the child's own peak RSS (VmHWM) at exit.
# (ru_maxrss from wait4 is no good here: Linux carries the forking parent's high-water mark
# -- this script's, holding the built data -- across exec into the child's figure.)
RUN_CLI = """
import atexit, sys
def hwm():
    with open("/proc/self/status") as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    sys.stderr.write(f"VmHWM {kib}\\n")
atexit.register(hwm)
from better_agent_peewee.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
sys.exit(code)
"""


def child(args: List[str], env: Dict[str, str]) -> Tuple[float, int, str]:
    """Run the command line with `args`; (wall seconds, peak RSS in MiB, stdout)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *args], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    kib = int(proc.stderr.rsplit("VmHWM ", 1)[1].split()[0])
    return seconds, kib // 1024, proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialect", choices=("sqlite", "postgres", "mysql"), default="sqlite")
    parser.add_argument("--database", help="URL of an existing EMPTY database (else a throwaway one)")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=10, help="events per run")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--no-analyze", action="store_true",
                        help="skip ANALYZE after the bulk load (PostgreSQL/MySQL): the cold-statistics case")
    args = parser.parse_args()

    server = None
    url = args.database
    if url is None and args.dialect == "sqlite":
        url = f"sqlite:///{tempfile.mkdtemp(prefix='bap-bench-')}/bench.db"
    elif url is None:
        from tests.servers import start_mariadb, start_postgres
        server = start_postgres() if args.dialect == "postgres" else start_mariadb()
        url = server.url + ("?charset=utf8mb4" if args.dialect == "mysql" else "")
    try:
        database = open_database(url)
        create_tables(database)
        storage = peewee_storage(database)
        started = time.monotonic()
        build(storage, args.runs, args.events)
        print(f"built {args.runs:,} runs, {args.runs:,} streams, {args.runs * args.events:,} events "
              f"in {time.monotonic() - started:.1f}s ({storage.dialect.name})")
        if not args.no_analyze and storage.dialect.name != "sqlite":
            # A bulk load leaves the server without statistics (autovacuum catches up later);
            # without them PostgreSQL plans sequential scans. Measure the steady state.
            analyze = {"postgres": "ANALYZE {}", "mysql": "ANALYZE TABLE {}"}[storage.dialect.name]
            for table in ("agent_runs", "streams", "stream_events"):
                database.execute_sql(analyze.format(table))
        database.close()

        env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(ROOT))
        seconds, rss, _ = child(["check"], env)
        print(f"baseline (`check`: import, connect, inspect the schema): {seconds:.1f}s wall, "
              f"{rss} MiB peak RSS")
        prune = ["prune", "--older-than", "7d", "--batch-size", str(args.batch_size)]
        for label, argv in (("dry run", prune + ["--dry-run"]), ("prune", prune)):
            seconds, rss, out = child(argv, env)
            print(f"{label}: {seconds:.1f}s wall, {rss} MiB peak RSS -- {out}")
        seconds, rss, out = child(["stats"], env)
        print("after:\n" + out)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
