"""What a PostgreSQL `streams.append` pays for, part by part (raw psycopg2, interleaved A/B/C...).

    python -m bench.append_cost [--rounds 9] [--ops 300] [--listeners 0 1]

One throwaway PostgreSQL server (tests/servers.py); its tables made by `create_tables` on a
connection that is then closed, so every variant runs on a fresh connection: a backend
that has checked a foreign key (creating the tables' constraints counts) ran every later
``INSERT ... SELECT`` here some 60 µs slower, raw or not, so the sides must start alike.
Each variant appends one event per operation to a stream of its own, batch after batch,
the order rotated every round:

* the raw baseline's statement (bench W6: ``INSERT ... SELECT`` numbering the event), then
  the same with ``FOR SHARE OF s`` (or ``FOR KEY SHARE``) on the stream row, with
  ``RETURNING pg_notify(...)``, with both, and with both plus the status check: a baseline
  keeping the adapter's promises (a closed stream refused, an append racing a close lands
  before it or not at all, other processes woken);
* the adapter's statement (the seq given and checked, the status checked) sent by raw
  psycopg2: plain, with the share lock, with the NOTIFY, with both (what the adapter sends),
  with a constant NOTIFY payload, and with the NOTIFY skipped unless a LISTENing process holds
  an advisory lock shared (a design tried and not taken: the lock costs what the NOTIFY does);
* ``storage.streams.append`` itself;
* single-statement probes: ``SELECT 1``, ``SELECT pg_notify(...)`` (a NOTIFY's commit
  alone), the stream row read plainly, ``FOR SHARE`` and ``FOR KEY SHARE``.

Reported per operation: wall time (median over rounds, and its ratio to the baseline), client
CPU (this process) and server CPU (every process of the server, /proc schedstat), the latter
two as totals over all rounds divided by the operations. With ``--listeners 1`` a second
process LISTENs on the streams' channel throughout (its own CPU is counted in neither column,
its backend's is in the server's). Not a test: nothing asserts a time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import peewee

from better_agent_peewee import create_tables, peewee_storage

#: The NOTIFY channel and payload the adapter sends (PostgresDialect.notify_sql).
NOTIFY = ("pg_notify('better_agent_streams', "
          "CASE WHEN octet_length(run_id) <= 7000 THEN run_id ELSE '' END)")
#: NOTIFY only when the exclusive advisory lock cannot be had: some poller holds it shared.
WHEN_LISTENED = f"CASE WHEN pg_try_advisory_xact_lock(1112359751, 1) THEN NULL ELSE {NOTIFY} END"
_INSERT = 'INSERT INTO stream_events (id, run_id, seq, "timestamp", event) '
_STORAGE = "storage.streams.append"
#: The baseline made to keep the adapter's promises too: closed streams refused, a close waits
#: for the appends racing it, other processes woken.
GUARDED = "  + status check + FOR SHARE + pg_notify (the same promises)"
#: bench.workloads' baseline append (the next seq computed in the statement) ...
BASELINE = (_INSERT + "SELECT s.id || ':' || n.seq, s.id, n.seq, %(ts)s, %(ev)s FROM streams s, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM stream_events WHERE run_id = %(run)s) n "
            "WHERE s.id = %(run)s{lock} RETURNING {returning}")
#: ... and the adapter's (the seq given, checked against the last one; the status checked).
ADAPTER = (_INSERT + "SELECT %(id)s, %(run)s, %(seq)s, %(ts)s, CAST(%(ev)s AS jsonb) FROM streams t1 "
           "WHERE t1.id = %(run)s AND (SELECT COALESCE(MAX(seq), 0) FROM stream_events "
           "WHERE run_id = %(run)s) = %(prev)s AND t1.status = 'open'{lock} "
           "ON CONFLICT DO NOTHING{returning}")

VARIANTS: Dict[str, Optional[str]] = {
    "baseline INSERT ... SELECT": BASELINE.format(lock="", returning="seq"),
    "  + FOR SHARE": BASELINE.format(lock=" FOR SHARE OF s", returning="seq"),
    "  + FOR KEY SHARE": BASELINE.format(lock=" FOR KEY SHARE OF s", returning="seq"),
    "  + RETURNING pg_notify": BASELINE.format(lock="", returning=NOTIFY),
    "  + FOR SHARE + pg_notify": BASELINE.format(lock=" FOR SHARE OF s", returning=NOTIFY),
    GUARDED: BASELINE.format(lock=" AND s.status = 'open' FOR SHARE OF s", returning=NOTIFY),
    "adapter's INSERT, raw: plain": ADAPTER.format(lock="", returning=""),
    "  + FOR SHARE ": ADAPTER.format(lock=" FOR SHARE", returning=""),
    "  + RETURNING pg_notify ": ADAPTER.format(lock="", returning=" RETURNING " + NOTIFY),
    "  + both (what the adapter sends)": ADAPTER.format(lock=" FOR SHARE", returning=" RETURNING " + NOTIFY),
    "  + FOR SHARE + pg_notify(channel, '')": ADAPTER.format(
        lock=" FOR SHARE", returning=" RETURNING pg_notify('better_agent_streams', '')"),
    "  + FOR SHARE + pg_notify unless no process listens": ADAPTER.format(
        lock=" FOR SHARE", returning=" RETURNING " + WHEN_LISTENED),
    _STORAGE: None,
    "SELECT 1": "SELECT 1",
    "SELECT pg_notify(channel, run id)": "SELECT pg_notify('better_agent_streams', %(run)s)",
    "SELECT the stream row": "SELECT 1 FROM streams WHERE id = %(run)s",
    "  FOR SHARE  ": "SELECT 1 FROM streams WHERE id = %(run)s FOR SHARE",
    "  FOR KEY SHARE ": "SELECT 1 FROM streams WHERE id = %(run)s FOR KEY SHARE",
    "SELECT pg_try_advisory_xact_lock": "SELECT pg_try_advisory_xact_lock(1112359751, 2)",
}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_LISTENER = """
import select, sys, psycopg2
conn = psycopg2.connect(sys.argv[1]); conn.autocommit = True
conn.cursor().execute("LISTEN better_agent_streams")
conn.cursor().execute("SELECT pg_advisory_lock_shared(1112359751, 1)")  # "some process listens"
print("ready", flush=True)
while True:
    select.select([conn], [], [], 1.0)
    conn.poll()
    del conn.notifies[:]
"""


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of the server's processes (the postmaster and its children), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != postmaster and int(entry) != postmaster:
                continue
            with open(f"/proc/{entry}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return total / 1e9


def measure(url_server: Any, rounds: int, ops: int, listeners: int,
            only: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Every variant, interleaved: [{variant, wall_us, ratio, client_us, server_us}, ...]."""
    kwargs = url_server.connect_kwargs()
    name = kwargs.pop("database")
    database = peewee.PostgresqlDatabase(name, **kwargs)
    create_tables(database)
    database.close()  # the storage gets a fresh connection, as the raw side does
    storage = peewee_storage(database)
    raw = url_server.connect()
    cursor = raw.cursor()
    children = [subprocess.Popen([sys.executable, "-c", _LISTENER, url_server.url], stdout=subprocess.PIPE,
                                 text=True) for _ in range(listeners)]
    try:
        for child in children:
            if child.stdout is None or child.stdout.readline().strip() != "ready":
                raise RuntimeError("the listener did not start")
        event = {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "hello world " * 3}
        body = json.dumps(event, separators=(",", ":"))
        names = [v for i, v in enumerate(VARIANTS) if i == 0 or not only or any(o in v for o in only)]
        runs = {v: f"{listeners}l-v{i}" for i, v in enumerate(names)}
        for v in names:
            if VARIANTS[v] is None:
                storage.streams.open(runs[v])
            else:
                cursor.execute("INSERT INTO streams (id, run_id, status, created_at, updated_at) "
                               "VALUES (%s, %s, 'open', now(), now())", (runs[v], runs[v]))
        next_seq = {v: 1 for v in names}

        def batch(v: str, n: int) -> None:
            run, sql = runs[v], VARIANTS[v]
            if sql is None:
                append = storage.streams.append
                for _ in range(n):
                    append(run, event)
                return
            execute, seq, insert = cursor.execute, next_seq[v], sql.startswith("INSERT")
            for _ in range(n):
                # A datetime, as the baseline's ts_in and the adapter's encode_ts pass it.
                stamp = _EPOCH + dt.timedelta(milliseconds=1_764_000_000_000 + seq)
                execute(sql, {"id": f"{run}:{seq}", "run": run, "seq": seq, "prev": seq - 1, "ts": stamp,
                              "ev": body})
                if insert and cursor.rowcount != 1:
                    raise AssertionError(f"{v}: event {seq} not stored")
                seq += 1
            next_seq[v] = seq

        for v in names:
            batch(v, 50)  # warm up: plans cached, pages in memory
        wall: Dict[str, List[float]] = {v: [] for v in names}
        client = {v: 0.0 for v in names}
        server = {v: 0.0 for v in names}
        pid = url_server.pid
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for v in (order if r % 2 == 0 else order[::-1]):
                s0, c0, t0 = server_cpu_seconds(pid), time.process_time(), time.perf_counter()
                batch(v, ops)
                t1, c1, s1 = time.perf_counter(), time.process_time(), server_cpu_seconds(pid)
                wall[v].append((t1 - t0) / ops)
                client[v] += c1 - c0
                server[v] += s1 - s0
        base = statistics.median(wall[names[0]])
        total = rounds * ops
        return [{"variant": v, "wall_us": statistics.median(wall[v]) * 1e6,
                 "ratio": statistics.median(wall[v]) / base, "client_us": client[v] / total * 1e6,
                 "server_us": server[v] / total * 1e6} for v in names]
    finally:
        for child in children:
            child.kill()
            child.wait()
        raw.close()
        database.close()


def format_rows(rows: List[Dict[str, Any]]) -> str:
    """The rows as a Markdown table, and the adapter's cost against both baselines."""
    lines = ["| variant | wall µs | ratio | client CPU µs | server CPU µs |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {('… ' if r['variant'].startswith(' ') else '') + r['variant'].strip()} "
              f"| {r['wall_us']:.0f} | {r['ratio']:.2f} | {r['client_us']:.0f} | {r['server_us']:.0f} |"
              for r in rows]
    by = {r["variant"]: r for r in rows}
    if _STORAGE in by and GUARDED in by:
        ours, plain, guarded = by[_STORAGE], rows[0], by[GUARDED]
        cpu = ours["client_us"] + ours["server_us"]
        lines.append("")
        lines.append(f"{_STORAGE}: wall {ours['wall_us'] / plain['wall_us']:.2f} x the plain baseline, "
                     f"{ours['wall_us'] / guarded['wall_us']:.2f} x the one keeping the same promises; CPU "
                     f"(client + server) {cpu / (plain['client_us'] + plain['server_us']):.2f} x and "
                     f"{cpu / (guarded['client_us'] + guarded['server_us']):.2f} x.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None, log: Callable[[str], None] = print) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.append_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ops", type=int, default=300, help="appends per variant per round")
    parser.add_argument("--only", metavar="TEXT", action="append",
                        help="only the variants whose name contains TEXT (repeatable; the baseline "
                             "always runs)")
    parser.add_argument("--listeners", type=int, nargs="+", default=[0, 1],
                        help="LISTENing processes during a pass (one pass per number given)")
    args = parser.parse_args(argv)
    from tests.servers import start_postgres

    server = start_postgres()
    try:
        for listeners in args.listeners:
            log(f"{listeners} listening process(es), {args.rounds} rounds of {args.ops} appends per variant:")
            log(format_rows(measure(server, args.rounds, args.ops, listeners, args.only)))
            log("")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
