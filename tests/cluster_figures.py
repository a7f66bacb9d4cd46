"""Figures of the cluster scenarios (writes acknowledged, errors seen, failover time).

    PYTHONPATH=$PWD python -m tests.cluster_figures [--seconds 8] [scenario ...]

Starts each topology on 127.0.0.1 (tests/cluster.py), runs the scenario, checks that
nothing was lost or duplicated and prints one JSON line per scenario. The cluster suite
(tests/cluster/) asserts on the same scenarios; this prints the numbers for docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import peewee

from better_agent_peewee import create_tables, peewee_storage
from tests import cluster_load as load
from tests.cluster import start_galera, start_pg_replicated, start_pgbouncer
from tests.servers import Server


def mysql_db(srv: Server) -> peewee.Database:
    kw = {k: v for k, v in srv.connect_kwargs().items() if k != "database"}
    return peewee.MySQLDatabase(srv.database, **kw)


def pg_db(srv: Server, **extra: Any) -> peewee.Database:
    kw = {k: v for k, v in srv.connect_kwargs().items() if k != "database"}
    kw.update(extra)
    return peewee.PostgresqlDatabase(srv.database, **kw)


def open_url(url: str) -> peewee.Database:
    """open_database(url); on a library that refuses multi-host URLs, the hand-built equivalent."""
    from better_agent_peewee.cli import open_database

    try:
        return open_database(url)
    except Exception as exc:
        print(f"  open_database refused the URL: {load.describe(exc)}", file=sys.stderr)
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        creds, hosts = parts.netloc.rsplit("@", 1)
        user, password = creds.split(":", 1)
        pairs = [h.split(":") for h in hosts.split(",")]
        return peewee.PostgresqlDatabase(parts.path.lstrip("/"), user=user, password=password,
                                         host=",".join(h for h, _ in pairs),
                                         port=",".join(p for _, p in pairs),
                                         target_session_attrs="read-write", connect_timeout=2)


def report(name: str, result: dict[str, Any], **more: Any) -> dict[str, Any]:
    out = {k: v for k, v in result.items() if k not in ("writers", "followers")}
    out.update(more)
    out["scenario"] = name
    print(json.dumps(out, default=str), flush=True)
    return out


def galera_writers(seconds: float) -> dict[str, Any]:
    """9 writers, 3 per node, on one stream, run and thread."""
    g = start_galera()
    dbs: list[peewee.Database] = []
    try:
        setup_db = mysql_db(g.nodes[0])
        create_tables(setup_db)
        load.setup(peewee_storage(setup_db))

        def make(i: int) -> Any:
            db = mysql_db(g.nodes[i % 3])
            dbs.append(db)
            return peewee_storage(db)
        result = load.run_load(make, 9, seconds)
        checked = [load.check(peewee_storage(mysql_db(n)), result["writers"], label=f"node{i + 1}")
                   for i, n in enumerate(g.nodes)]
        assert all(c == checked[0] for c in checked), checked
        return report("galera_writers", result, checked=checked[0])
    finally:
        for db in dbs:
            load.close(db)
        g.stop()


def galera_read_your_writes(rounds: int = 200) -> dict[str, Any]:
    """open on node 1 then append on node 2; runs.start on node 1 then runs.get on node 3."""
    g = start_galera()
    try:
        dbs = [mysql_db(n) for n in g.nodes]
        create_tables(dbs[0])
        s = [peewee_storage(db) for db in dbs]
        errors: dict[str, int] = {}
        missing_runs = 0
        for k in range(rounds):
            s[0].streams.open(f"r{k}")
            try:
                s[1].streams.append(f"r{k}", {"type": "T"})
            except Exception as exc:
                key = load.describe(exc)
                errors[key] = errors.get(key, 0) + 1
            s[0].runs.start(f"q{k}", "a")
            if s[2].runs.get(f"q{k}") is None:
                missing_runs += 1
        return report("galera_read_your_writes", {"rounds": rounds, "errors": sum(errors.values()),
                                                   "error_kinds": errors, "runs_get_none": missing_runs})
    finally:
        g.stop()


def galera_node_killed(seconds: float) -> dict[str, Any]:
    """6 writers and 2 followers through haproxy; node 3 SIGKILLed halfway, then rejoined."""
    g = start_galera()
    dbs: list[peewee.Database] = []
    try:
        setup_db = mysql_db(g.proxy)
        create_tables(setup_db)
        load.setup(peewee_storage(setup_db))

        def make(i: int) -> Any:
            db = mysql_db(g.proxy)
            dbs.append(db)
            return peewee_storage(db)

        def fault() -> dict[str, float]:
            t0 = time.monotonic()
            g.kill(2)
            time.sleep(1)
            t1 = time.monotonic()
            g.rejoin(2)
            return {"kill_to_restart": round(t1 - t0, 2), "rejoin_seconds": round(time.monotonic() - t1, 2)}
        result = load.run_load(make, 6, seconds, fault=fault, followers=2)
        checked = [load.check(peewee_storage(mysql_db(n)), result["writers"], result["followers"],
                              label=f"node{i + 1}") for i, n in enumerate(g.nodes)]
        return report("galera_node_killed", result, checked=checked[0])
    finally:
        for db in dbs:
            load.close(db)
        g.stop()


def pg_failover(seconds: float) -> dict[str, Any]:
    """4 writers and 2 followers through the multi-host URL; primary SIGKILLed, standby promoted."""
    pair = start_pg_replicated()
    dbs: list[peewee.Database] = []
    try:
        setup_db = open_url(pair.multi_host_url)
        dbs.append(setup_db)
        create_tables(setup_db)
        load.setup(peewee_storage(setup_db))

        def make(i: int) -> Any:
            db = open_url(pair.multi_host_url)
            dbs.append(db)
            return peewee_storage(db)

        def fault() -> dict[str, float]:
            promote = pair.fail_over()
            t0 = time.monotonic()
            return {"kill_to_promoted": round(promote, 2), "at": t0}
        result = load.run_load(make, 4, seconds, fault=fault, followers=2)
        checked = load.check(peewee_storage(pg_db(pair.standby)), result["writers"], result["followers"])
        return report("pg_failover", result, checked=checked)
    finally:
        for db in dbs:
            load.close(db)
        pair.stop()


def pg_standby_follower(rounds: int = 200) -> dict[str, Any]:
    """Append on the primary, follow on the standby; then a write on the standby."""
    pair = start_pg_replicated()
    try:
        primary, standby = pg_db(pair.primary), pg_db(pair.standby)
        create_tables(primary)
        p, s = peewee_storage(primary), peewee_storage(standby)
        p.streams.open(load.RUN)
        # A synchronous standby has the commit on disk, not yet replayed: wait to see the stream.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if s.streams.get(load.RUN) is not None:
                    break
            except peewee.ProgrammingError:  # the tables have not been replayed either
                standby.rollback()
            time.sleep(0.005)
        lags: list[float] = []
        it = s.streams.resume(load.RUN, 0, poll_interval=0.002)
        for k in range(rounds):
            t0 = time.monotonic()
            p.streams.append(load.RUN, {"type": "T", "k": k})
            item = next(it)
            assert item["k"] == k
            lags.append(time.monotonic() - t0)
        lags.sort()
        try:
            s.streams.append(load.RUN, {"type": "T"})
            write = "no error"
        except Exception as exc:
            write = load.describe(exc)
        return report("pg_standby_follower", {"rounds": rounds,
                                               "lag_p50_ms": round(lags[len(lags) // 2] * 1000, 2),
                                               "lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 2),
                                               "write_on_standby": write})
    finally:
        pair.stop()


def pgbouncer_restart(seconds: float) -> dict[str, Any]:
    """4 writers and 2 followers through pgbouncer (transaction mode); the backend restarted halfway."""
    pair = start_pg_replicated(synchronous=False)
    bouncer = start_pgbouncer(pair.primary)
    dbs: list[peewee.Database] = []
    try:
        setup_db = pg_db(bouncer.server)
        create_tables(setup_db)
        load.setup(peewee_storage(setup_db))

        def make(i: int) -> Any:
            db = pg_db(bouncer.server)
            dbs.append(db)
            return peewee_storage(db)

        def fault() -> dict[str, float]:
            t0 = time.monotonic()
            pair.primary.restart()
            return {"restart_seconds": round(time.monotonic() - t0, 2)}
        result = load.run_load(make, 4, seconds, fault=fault, followers=2)
        checked = load.check(peewee_storage(pg_db(pair.primary)), result["writers"], result["followers"])
        return report("pgbouncer_restart", result, checked=checked)
    finally:
        for db in dbs:
            load.close(db)
        bouncer.stop()
        pair.stop()


def _timed(call: Callable[[int], Any], n: int) -> float:
    """Median seconds of `call(k)` over n calls."""
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        call(k)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _op_costs(storage: Any, n: int, tag: str) -> dict[str, float]:
    """Median ms of a read by key, an upsert and a stream append on `storage`."""
    storage.streams.open(f"cost-{tag}")
    storage.set("runs", f"cost-{tag}", {"runId": f"cost-{tag}", "agentName": "a", "status": "running",
                                         "startedAt": 1, "updatedAt": 1})
    return {
        "get_ms": round(_timed(lambda k: storage.get("runs", f"cost-{tag}"), n) * 1000, 3),
        "set_ms": round(_timed(lambda k: storage.set("runs", f"cost-{tag}", {
            "runId": f"cost-{tag}", "agentName": "a", "status": "running", "startedAt": 1,
            "updatedAt": k}), n) * 1000, 3),
        "append_ms": round(_timed(lambda k: storage.streams.append(f"cost-{tag}", {"type": "T", "k": k}), n)
                           * 1000, 3),
    }


def costs(seconds: float, n: int = 400) -> dict[str, Any]:
    """Median cost per operation on each topology, and Galera's causal reads on and off
    (measured interleaved in rounds: the machine is shared)."""
    from tests.servers import start_mariadb, start_postgres

    out: dict[str, Any] = {}
    single_pg = start_postgres()
    pair = start_pg_replicated()
    bouncer = start_pgbouncer(pair.primary)
    try:
        for name, srv in (("postgres_single", single_pg), ("postgres_sync_standby", pair.primary),
                          ("pgbouncer_transaction", bouncer.server)):
            db = pg_db(srv)
            create_tables(db)
            out[name] = _op_costs(peewee_storage(db), n, name)
            load.close(db)
        # One primary's append rate: 8 writers, one stream each (the number a shard starts from).
        for name, srv in (("postgres_single", single_pg), ("postgres_sync_standby", pair.primary)):
            rate_dbs = [pg_db(srv) for _ in range(8)]
            rate = _append_rate([peewee_storage(db) for db in rate_dbs], seconds)
            out[f"{name}_appends_per_s_8_writers"] = rate
            for db in rate_dbs:
                load.close(db)
    finally:
        bouncer.stop()
        pair.stop()
        single_pg.stop()
    single_my = start_mariadb()
    g = start_galera()
    try:
        db = mysql_db(single_my)
        create_tables(db)
        out["mariadb_single"] = _op_costs(peewee_storage(db), n, "single")
        create_tables(mysql_db(g.nodes[0]))
        for name, srv in (("galera_node", g.nodes[1]), ("galera_haproxy", g.proxy)):
            out[name] = _op_costs(peewee_storage(mysql_db(srv)), n, name)
        on = peewee_storage(mysql_db(g.nodes[1]))
        off = peewee_storage(mysql_db(g.nodes[1]), causal_reads=False)
        on.set("runs", "causal", {"runId": "causal", "agentName": "a", "status": "running", "startedAt": 1,
                                  "updatedAt": 1})
        rounds: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(5):
            rounds["on"].append(_timed(lambda k: on.get("runs", "causal"), n // 4))
            rounds["off"].append(_timed(lambda k: off.get("runs", "causal"), n // 4))
        out["galera_get_ms_causal_reads_on"] = round(sorted(rounds["on"])[2] * 1000, 3)
        out["galera_get_ms_causal_reads_off"] = round(sorted(rounds["off"])[2] * 1000, 3)
    finally:
        g.stop()
        single_my.stop()
    return report("costs", out)


def _append_rate(storages: list[Any], seconds: float) -> float:
    for i, s in enumerate(storages):
        s.streams.open(f"rate-{i}")
    import threading

    stop = threading.Event()
    counts = [0] * 8

    def writer(i: int) -> None:
        while not stop.is_set():
            storages[i].streams.append(f"rate-{i}", {"type": "T"})
            counts[i] += 1
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return round(sum(counts) / seconds, 1)


SCENARIOS: dict[str, Callable[[float], dict[str, Any]]] = {
    "galera_writers": galera_writers,
    "galera_read_your_writes": lambda _s: galera_read_your_writes(),
    "galera_node_killed": galera_node_killed,
    "pg_failover": pg_failover,
    "pg_standby_follower": lambda _s: pg_standby_follower(),
    "pgbouncer_restart": pgbouncer_restart,
    "costs": costs,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("scenario", nargs="*", choices=[*SCENARIOS, []])
    args = parser.parse_args()
    for name in args.scenario or SCENARIOS:
        try:
            SCENARIOS[name](args.seconds)
        except Exception as exc:
            print(json.dumps({"scenario": name, "FAILED": load.describe(exc)}), flush=True)


if __name__ == "__main__":
    main()
