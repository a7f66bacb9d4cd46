"""Options for replicated setups, on the ordinary test servers: agent_runs.run_id as primary
key, libpq multi-host URLs, writes refused by a read-only server, conflicts retried.

The replicated topologies themselves (Galera, a standby, pgbouncer) are exercised by the
cluster suite (tests/cluster_suite/).
"""
from __future__ import annotations

from typing import Callable

import peewee
import pytest

from better_agent_peewee import check_schema, create_tables, peewee_storage
from better_agent_peewee.cli import DatabaseURLError, open_database
from tests.samples import run
from tests.servers import Server, _free_port


def test_run_id_as_primary_key_is_the_same_table(database: peewee.Database) -> None:
    """run_primary_key=True: run_id is the primary key, check_schema accepts it, runs work as before."""
    create_tables(database, run_primary_key=True)
    assert database.get_primary_keys("agent_runs") == ["run_id"]
    assert check_schema(database) == []
    storage = peewee_storage(database)
    storage.set("runs", "r1", run("r1"))
    storage.set("runs", "r1", run("r1", status="completed"))
    assert storage.get("runs", "r1")["status"] == "completed"
    assert [r["runId"] for r in storage.list("runs")["items"]] == ["r1"]
    storage.delete("runs", "r1")
    assert storage.get("runs", "r1") is None


def test_unique_form_is_the_default(database: peewee.Database) -> None:
    create_tables(database)
    assert database.get_primary_keys("agent_runs") == []
    assert check_schema(database) == []


@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_server_requiring_primary_keys_gets_one(server: Server, database: peewee.Database) -> None:
    """MariaDB with innodb_force_primary_key (as Galera's REQUIRED_PRIMARY_KEY): create_tables works."""
    server.admin_execute("SET GLOBAL innodb_force_primary_key = 1")
    try:
        with pytest.raises(peewee.DatabaseError):  # the server does refuse a table without one
            database.execute_sql("CREATE TABLE no_key (a INT)")
        create_tables(database)
    finally:
        server.admin_execute("SET GLOBAL innodb_force_primary_key = 0")
    assert database.get_primary_keys("agent_runs") == ["run_id"]
    assert check_schema(database) == []


def test_multi_host_url_is_split_for_libpq() -> None:
    db = open_database("postgresql://u:p%40ss@h1:5433,h2/app?target_session_attrs=read-write&connect_timeout=3")
    assert isinstance(db, peewee.PostgresqlDatabase)
    assert db.database == "app"
    assert db.connect_params["host"] == "h1,h2"
    assert db.connect_params["port"] == "5433,5432"
    assert db.connect_params["target_session_attrs"] == "read-write"
    assert db.connect_params["password"] == "p@ss"
    with pytest.raises(DatabaseURLError, match="host1:port1,host2:port2"):
        open_database("postgresql://u:p@h1:x,h2:5432/app")


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
def test_multi_host_url_skips_an_unreachable_host(server: Server,
                                                  make_database: Callable[..., peewee.Database]) -> None:
    """libpq tries the hosts in order: the first one is down, the second answers."""
    make_database()  # empties the test database
    dead = _free_port()
    url = (f"postgresql://{server.user}:{server.password}@127.0.0.1:{dead},{server.host}:{server.port}/"
           f"{server.database}?target_session_attrs=read-write&connect_timeout=2")
    db = open_database(url)
    try:
        create_tables(db)
        storage = peewee_storage(db)
        storage.streams.open("r1")
        assert storage.streams.append("r1", {"type": "T"}) == 1
    finally:
        db.close()


