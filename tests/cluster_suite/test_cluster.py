"""The cluster suite: the library on replicated topologies started here on 127.0.0.1.

Run by ``.ci/run`` as ``pytest --cluster tests/cluster_suite`` (deselected otherwise):

* a 3-node MariaDB Galera cluster behind haproxy: writers on every node on one stream,
  run and thread; read-your-writes across nodes; a node SIGKILLed and rejoining under load;
  a server requiring primary keys;
* a PostgreSQL primary with a synchronous standby: the primary SIGKILLed and the standby
  promoted under load (writers and followers through a libpq multi-host URL); a follower
  on the standby, and a write there;
* pgbouncer in transaction mode: a backend restart under load, with psycopg2 and psycopg 3;
* the contract suite (tests/test_storage.py, test_streams.py, test_memory.py, test_runs.py)
  through haproxy, through the primary of the pair and through pgbouncer with both drivers.

Every scenario asserts nothing lost, nothing duplicated, seq exact (on every Galera node),
and zero errors seen by the callers: the operations run outside user transactions with the
default reconnect window. Scenario durations are short (seconds) to keep CI fast; the
figures for docs/scaling.md come from ``python -m tests.cluster_figures``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import peewee
import pytest

from better_agent_peewee import ReadOnlyError, check_schema, create_tables, peewee_storage
from better_agent_peewee.cli import open_database
from tests import cluster_load as load
from tests.cluster import GaleraCluster, PgPair, start_galera, start_pg_replicated, start_pgbouncer
from tests.servers import Server

pytestmark = pytest.mark.cluster

SECONDS = float(os.environ.get("BAP_CLUSTER_SECONDS", "4"))
ROOT = Path(__file__).resolve().parents[2]
CONTRACT_FILES = ["tests/test_storage.py", "tests/test_streams.py", "tests/test_memory.py",
                  "tests/test_runs.py"]


def mysql_db(srv: Server, database: str) -> peewee.Database:
    kw = {k: v for k, v in srv.connect_kwargs().items() if k != "database"}
    return peewee.MySQLDatabase(database, **kw)


def pg_db(srv: Server, **extra: Any) -> peewee.Database:
    kw = {k: v for k, v in srv.connect_kwargs().items() if k != "database"}
    kw.update(extra)
    return peewee.PostgresqlDatabase(srv.database, **kw)


def no_errors(result: dict[str, Any]) -> None:
    assert not result["hung"], f"threads hang: {result['hung']}"
    crashed = [w.crash for w in result["writers"] if w.crash is not None]
    assert not crashed, crashed
    assert result["errors"] == 0, f"errors seen by callers: {result['error_kinds']}"
    assert result["acknowledged_events"] > 0 and result["acknowledged_messages"] > 0


def run_contract_suite(env: dict[str, str]) -> None:
    """The contract test files in a subprocess against the server given by URL in `env`."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *CONTRACT_FILES]
    proc = subprocess.run(argv,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                          text=True, timeout=900, check=False)
    tail = "\n".join(proc.stdout.splitlines()[-25:])
    assert proc.returncode == 0, f"contract suite failed:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail, tail


# -- Galera ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def galera() -> Iterator[GaleraCluster]:
    cluster = start_galera()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def galera_db(galera: GaleraCluster, request: pytest.FixtureRequest) -> str:
    """A fresh database (created through node 1, replicated to all) for one test."""
    name = f"bap_{request.node.name.split('[')[0][5:40]}"
    galera.nodes[0].drop_database(name)
    galera.nodes[0].create_database(name)
    return name


def test_galera_writers_on_every_node(galera: GaleraCluster, galera_db: str) -> None:
    """9 writers, 3 per node, on one stream, run and thread: certification conflicts are retried."""
    create_tables(mysql_db(galera.nodes[0], galera_db))
    load.setup(peewee_storage(mysql_db(galera.nodes[0], galera_db)))
    dbs: list[peewee.Database] = []

    def make(i: int) -> Any:
        dbs.append(mysql_db(galera.nodes[i % 3], galera_db))
        return peewee_storage(dbs[-1])
    try:
        result = load.run_load(make, 9, SECONDS)
    finally:
        for db in dbs:
            load.close(db)
    no_errors(result)
    seen = [load.check(peewee_storage(mysql_db(n, galera_db)), result["writers"], label=f"node{i + 1}")
            for i, n in enumerate(galera.nodes)]
    assert all(s == seen[0] for s in seen), seen


def test_galera_reads_its_writes_on_another_node(galera: GaleraCluster, galera_db: str) -> None:
    """open on node 1, append on node 2; runs.start on node 1, runs.get on node 3: causal reads."""
    s = [peewee_storage(mysql_db(n, galera_db)) for n in galera.nodes]
    create_tables(s[0].database)
    for k in range(100):
        s[0].streams.open(f"r{k}")
        assert s[1].streams.append(f"r{k}", {"type": "T"}) == 1
        s[0].runs.start(f"q{k}", "agent")
        assert s[2].runs.get(f"q{k}") is not None


def test_galera_node_killed_and_rejoining_under_load(galera: GaleraCluster, galera_db: str) -> None:
    """6 writers and 2 followers through haproxy; node 3 SIGKILLed, restarted and resynced meanwhile."""
    create_tables(mysql_db(galera.proxy, galera_db))
    load.setup(peewee_storage(mysql_db(galera.proxy, galera_db)))
    dbs: list[peewee.Database] = []

    def make(i: int) -> Any:
        dbs.append(mysql_db(galera.proxy, galera_db))
        return peewee_storage(dbs[-1])

    def fault() -> None:
        galera.kill(2)
        time.sleep(0.5)
        galera.rejoin(2)
    try:
        result = load.run_load(make, 6, SECONDS * 2, fault=fault, followers=2)
    finally:
        for db in dbs:
            load.close(db)
    no_errors(result)
    assert galera.sizes() == [3, 3, 3]
    seen = [load.check(peewee_storage(mysql_db(n, galera_db)), result["writers"], result["followers"],
                       label=f"node{i + 1}") for i, n in enumerate(galera.nodes)]
    assert all(s == seen[0] for s in seen), seen


def test_galera_requiring_primary_keys(galera: GaleraCluster, galera_db: str) -> None:
    """wsrep_mode=REQUIRED_PRIMARY_KEY: create_tables makes agent_runs.run_id the primary key."""
    for node in galera.nodes:  # a node's own setting: haproxy may connect to any of them
        node.admin_execute("SET GLOBAL wsrep_mode = 'REQUIRED_PRIMARY_KEY'")
    try:
        db = mysql_db(galera.proxy, galera_db)
        create_tables(db)
        assert db.get_primary_keys("agent_runs") == ["run_id"]
        assert check_schema(db) == []
        storage = peewee_storage(db)
        storage.runs.start("r1", "agent")
        assert storage.runs.get("r1")["status"] == "running"
    finally:
        for node in galera.nodes:
            node.admin_execute("SET GLOBAL wsrep_mode = ''")


def test_contract_suite_through_haproxy(galera: GaleraCluster, galera_db: str) -> None:
    srv = galera.proxy
    url = f"mysql://{srv.user}:{srv.password}@{srv.host}:{srv.port}/{galera_db}"
    # The library's own sessions read causally; the suite's fixtures use raw connections
    # (wiping tables, checking rows) that may land on another node, so they need it too.
    for node in galera.nodes:
        node.admin_execute("SET GLOBAL wsrep_sync_wait = 15")
    try:
        run_contract_suite({"BAP_TEST_DIALECTS": "mysql", "BAP_TEST_MYSQL_URL": url})
    finally:
        for node in galera.nodes:
            node.admin_execute("SET GLOBAL wsrep_sync_wait = 0")


# -- PostgreSQL primary + synchronous standby ----------------------------------------------------

@pytest.fixture
def pair() -> Iterator[PgPair]:
    p = start_pg_replicated()
    try:
        yield p
    finally:
        p.stop()


def test_postgres_failover_under_load(pair: PgPair) -> None:
    """Writers and followers through a multi-host URL; the primary SIGKILLed, the standby promoted."""
    url = pair.multi_host_url + "&connect_timeout=2"
    setup_db = open_database(url)
    create_tables(setup_db)
    load.setup(peewee_storage(setup_db))
    dbs: list[peewee.Database] = [setup_db]

    def make(i: int) -> Any:
        dbs.append(open_database(url))
        return peewee_storage(dbs[-1])
    try:
        result = load.run_load(make, 4, SECONDS * 2, fault=pair.fail_over, followers=2)
    finally:
        for db in dbs:
            load.close(db)
    no_errors(result)
    load.check(peewee_storage(pg_db(pair.standby)), result["writers"], result["followers"])


def test_postgres_follower_on_the_standby(pair: PgPair) -> None:
    """A follower on the synchronous standby reads every event in order; a write there is ReadOnlyError."""
    primary, standby = peewee_storage(pg_db(pair.primary)), peewee_storage(pg_db(pair.standby))
    create_tables(primary.database)
    primary.streams.open(load.RUN)
    primary.streams.close("absent")  # a write that commits after the stream: once seen, the stream is there
    deadline = time.monotonic() + 10
    while True:  # the standby has the commit on disk; replaying it takes a moment more
        try:
            if standby.streams.get(load.RUN) is not None:
                break
        except peewee.ProgrammingError:  # the tables themselves are not replayed yet
            standby.database.rollback()
        assert time.monotonic() < deadline, "the standby never showed the stream"
        time.sleep(0.01)
    follower = standby.streams.resume(load.RUN, 0, poll_interval=0.005)
    for k in range(50):
        primary.streams.append(load.RUN, {"type": "T", "k": k})
        item = next(follower)
        assert (item["seq"], item["k"]) == (k + 1, k)
    with pytest.raises(ReadOnlyError, match="takes no writes"):
        standby.streams.append(load.RUN, {"type": "T"})


def test_contract_suite_on_the_primary_of_a_synchronous_pair(pair: PgPair) -> None:
    run_contract_suite({"BAP_TEST_DIALECTS": "postgres", "BAP_TEST_POSTGRES_URL": pair.primary.url})


# -- pgbouncer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["psycopg2", "psycopg3"])
def test_pgbouncer_backend_restart_under_load(pair: PgPair, driver: str) -> None:
    """4 writers and 2 followers through pgbouncer (transaction mode); the backend restarted halfway."""
    bouncer = start_pgbouncer(pair.primary)
    options: dict[str, Any] = {}
    if driver == "psycopg3":
        options = {"prefer_psycopg3": True, "prepare_threshold": None}
    dbs: list[peewee.Database] = []

    def make(i: int) -> Any:
        dbs.append(pg_db(bouncer.server, **options))
        return peewee_storage(dbs[-1])
    try:
        create_tables(make(0).database)
        load.setup(make(0))
        result = load.run_load(make, 4, SECONDS * 2, fault=pair.primary.restart, followers=2)
    finally:
        for db in dbs:
            load.close(db)
        bouncer.stop()
    no_errors(result)
    load.check(peewee_storage(pg_db(pair.primary)), result["writers"], result["followers"])


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg3"])
def test_contract_suite_through_pgbouncer(pair: PgPair, driver: str) -> None:
    bouncer = start_pgbouncer(pair.primary)
    try:
        run_contract_suite({"BAP_TEST_DIALECTS": "postgres", "BAP_TEST_POSTGRES_URL": bouncer.server.url,
                            "BAP_TEST_PG_DRIVER": driver})
    finally:
        bouncer.stop()
