"""Options for replicated setups, on the ordinary test servers: agent_runs.run_id as primary
key, libpq multi-host URLs, writes refused by a read-only server, conflicts retried.

The replicated topologies themselves (Galera, a standby, pgbouncer) are exercised by the
cluster suite (tests/cluster_suite/).
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, List

import peewee
import pytest

from better_agent_peewee import ReadOnlyError, StorageError, check_schema, create_tables, peewee_storage
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


_ABSENT = object()


def test_a_storage_changes_nothing_on_the_users_database_object(database: peewee.Database) -> None:
    """Per-connection setup (Galera's causal reads) runs in the executor, at a connection's first
    statement: building and using a storage replaces no method and adds no attribute on the
    database object. (SQLite's permanent pragmas are the hook Peewee documents for that.)"""
    create_tables(database)
    database.connect(reuse_if_open=True)  # an open connection, as an application's would be
    before = dict(vars(database))
    storage = peewee_storage(database)
    storage.set("runs", "r1", run("r1"))
    assert storage.get("runs", "r1") is not None
    after = dict(vars(database))
    changed = sorted(k for k in before.keys() | after.keys()
                     if k != "_pragmas" and before.get(k, _ABSENT) is not after.get(k, _ABSENT))
    assert not changed, f"the storage changed the database object: {changed}"


def test_multi_host_url_is_split_for_libpq() -> None:
    db = open_database("postgresql://u:p%40ss@h1:5433,h2/app"
                       "?target_session_attrs=read-write&connect_timeout=3")
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




# -- writes refused by a read-only server ------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgres"], indirect=True)
def test_write_on_a_read_only_postgres_session_raises_read_only_error(
        make_database: Callable[..., peewee.Database]) -> None:
    """A hot standby refuses writes with SQLSTATE 25006; default_transaction_read_only gives the same."""
    create_tables(make_database())
    storage = peewee_storage(make_database(options="-c default_transaction_read_only=on"))
    assert storage.get("runs", "r1") is None  # reads work
    with pytest.raises(ReadOnlyError, match="takes no writes") as caught:
        storage.set("runs", "r1", run("r1"))
    assert isinstance(caught.value, StorageError)
    storage.streams  # noqa: B018 (the storage stays usable)
    with pytest.raises(ReadOnlyError):
        storage.streams.open("r1")


@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_write_on_a_read_only_mariadb_raises_read_only_error(server: Server,
                                                             database: peewee.Database) -> None:
    create_tables(database)
    storage = peewee_storage(database)
    server.admin_execute("SET GLOBAL read_only = 1")
    try:
        assert storage.get("runs", "r1") is None
        with pytest.raises(ReadOnlyError, match="takes no writes"):
            storage.set("runs", "r1", run("r1"))
    finally:
        server.admin_execute("SET GLOBAL read_only = 0")
    storage.set("runs", "r1", run("r1"))


# -- conflicts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres),
                                     pytest.param("mysql", marks=pytest.mark.mysql)], indirect=True)
def test_transaction_retries_reruns_a_block_that_deadlocked(
        make_database: Callable[..., peewee.Database]) -> None:
    """Two transactions lock two rows in opposite orders: the server kills one as a deadlock;
    @transaction(retries=...) runs it again and both blocks end up applied."""
    create_tables(make_database())
    storages = [peewee_storage(make_database()) for _ in range(2)]
    storages[0].set("runs", "a", run("a"))
    storages[0].set("runs", "b", run("b"))
    barrier = threading.Barrier(2, timeout=30)
    calls = [0, 0]
    errors: List[BaseException] = []

    def worker(k: int) -> None:
        s = storages[k]
        first, second = ("a", "b") if k == 0 else ("b", "a")

        @s.transaction(retries=3)
        def block() -> None:
            calls[k] += 1
            s.set("runs", first, run(first, status="completed", config={"by": k}))
            if calls[k] == 1:
                barrier.wait()  # both hold their first row: the second set deadlocks one of them
            s.set("runs", second, run(second, status="completed", config={"by": k}))
        try:
            block()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # The victim ran again; its rerun may beat the survivor to a row and deadlock once more,
    # so each block may have run more than once.
    assert max(calls) >= 2 and min(calls) >= 1
    configs = [storages[0].get("runs", r)["config"] for r in ("a", "b")]
    assert configs[0] == configs[1] and configs[0] in ({"by": 0}, {"by": 1})  # both rows are one block's


def test_transaction_retries_is_for_decorators_only(database: peewee.Database) -> None:
    create_tables(database)
    storage = peewee_storage(database)
    with pytest.raises(TypeError, match="decorator"):
        with storage.transaction(retries=2):
            pass
    with pytest.raises(ValueError, match="retries"):
        storage.transaction(retries=-1)


def test_reconnect_window_must_be_a_number_of_seconds(database: peewee.Database) -> None:
    with pytest.raises(ValueError, match="reconnect_window"):
        peewee_storage(database, reconnect_window=-1)


# -- reading back after a lost reply -----------------------------------------------------------

def test_append_read_back_tells_stored_taken_and_absent(database: peewee.Database) -> None:
    """What an append reads back after losing the reply: its event (stored), another (taken), none."""
    create_tables(database)
    storage = peewee_storage(database)
    storage.streams.open("r")
    event = {"type": "T", "nested": {"b": 1, "a": [1.5, None, "x"]}}
    assert storage.streams.append("r", event) == 1
    streams: Any = storage.streams
    rows = streams._appends._events  # the event rows' read-back (events.py)
    body = json.dumps(event)
    assert rows.read_back("r", 1, body).rowcount == 1
    assert rows.read_back("r", 1, json.dumps({"type": "other"})).rowcount == 0
    assert rows.read_back("r", 2, body) is None


def test_request_abort_read_back(database: peewee.Database) -> None:
    create_tables(database)
    storage = peewee_storage(database)
    storage.runs.start("r", "agent")
    runs: Any = storage.runs
    aborts = runs._aborts  # the abort stamp's read-back (aborts.py)
    assert aborts.read_back("r", 5) is None  # not stamped: the UPDATE may run again
    assert storage.runs.request_abort("r")  # REQUESTED
    stamp = storage.runs.get("r")["abortRequestedAt"]
    assert aborts.read_back("r", stamp).rowcount == 1
    assert aborts.read_back("r", stamp + 1).rowcount == 0


def test_message_read_back(database: peewee.Database) -> None:
    create_tables(database)
    storage = peewee_storage(database)
    storage.memory.threads.set("t", {"agentName": "a", "createdAt": 1, "updatedAt": 1})
    stored = storage.memory.messages.append("t", [{"id": "m1", "role": "user", "content": "c"}] * 1)
    messages: Any = storage.memory.messages
    (first,), = database.execute_sql("SELECT id FROM messages").fetchall()
    assert stored and messages._read_back(first, 1).rowcount == 1
    assert messages._read_back("t:0:absent", 1) is None


@pytest.mark.mysql
@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_a_lock_wait_timeout_is_retried_then_reported_as_contention(
        server: Server, make_database: Callable[..., peewee.Database],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A row held by another transaction: the upsert's lock wait times out (1205), is run again
    while the holder keeps it, and succeeds once it lets go; held for good, ContentionError."""
    from better_agent_peewee import ContentionError, executor

    monkeypatch.setattr(executor, "CONFLICT_SECONDS", 2.5)
    create_tables(make_database())
    storage = peewee_storage(make_database(init_command="SET SESSION innodb_lock_wait_timeout = 1"))
    storage.set("runs", "r1", run("r1"))
    holder = server.connect()
    cur = holder.cursor()
    cur.execute("BEGIN")
    cur.execute("SELECT * FROM agent_runs WHERE run_id = 'r1' FOR UPDATE")
    release = threading.Timer(1.5, holder.commit)
    release.start()
    try:
        storage.set("runs", "r1", run("r1", status="completed"))  # waits, times out, runs again, succeeds
    finally:
        release.join()
    assert storage.get("runs", "r1")["status"] == "completed"

    cur.execute("BEGIN")
    cur.execute("SELECT * FROM agent_runs WHERE run_id = 'r1' FOR UPDATE")
    try:
        with pytest.raises(ContentionError, match="retry the operation later") as caught:
            storage.set("runs", "r1", run("r1", status="failed"))
        assert isinstance(caught.value, StorageError)
    finally:
        holder.rollback()
        holder.close()
    assert storage.get("runs", "r1")["status"] == "completed"
