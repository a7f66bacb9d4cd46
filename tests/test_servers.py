"""The test infrastructure itself: servers and per-test empty databases."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import peewee
import pytest

from tests.servers import Server


class Note(peewee.Model):
    text = peewee.TextField()


def test_database_fixture_roundtrip(database: peewee.Database) -> None:
    with database.connection_context():
        assert database.execute_sql("SELECT 1").fetchone()[0] == 1
        assert database.get_tables() == []  # empty at test start
        with database.bind_ctx([Note]):
            database.create_tables([Note])
            Note.create(text="hello ✓")
            assert Note.get().text == "hello ✓"
            assert database.get_tables() == ["note"]
            database.drop_tables([Note])
        assert database.get_tables() == []


_leaked: list = []  # raw connections deliberately never closed


def test_leaves_a_mess_behind(  # type: ignore[no-untyped-def]
        database: peewee.Database, make_database) -> None:
    """Leaves a table, an open transaction and a leaked locking connection."""
    database.connect()
    with database.bind_ctx([Note]):
        database.create_tables([Note])
    database.begin()  # closed at teardown despite the open transaction
    other = make_database()
    other.connect()
    other.begin()
    other.execute_sql("INSERT INTO note (text) VALUES ('locked')")
    _leaked.append(other.connection())  # holds locks the next reset must break
    other.dispose()  # teardown no longer knows about it


def test_leftovers_are_gone(database: peewee.Database) -> None:
    with database.connection_context():
        assert database.get_tables() == []


def test_make_database_shares_data(make_database) -> None:  # type: ignore[no-untyped-def]
    a, b = make_database(), make_database()
    with a.bind_ctx([Note]):
        a.create_tables([Note])
        Note.create(text="from a")
    with b.bind_ctx([Note]):
        assert [n.text for n in Note.select()] == ["from a"]


def test_database_url_in_subprocess(
    database_url: str, database: peewee.Database
) -> None:
    code = (
        "import sys; from playhouse.db_url import connect\n"
        "db = connect(sys.argv[1]); db.execute_sql('CREATE TABLE from_child (x INT)')\n"
        "db.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, database_url], check=True, timeout=60)
    with database.connection_context():
        assert database.get_tables() == ["from_child"]


@pytest.mark.parametrize("dialect", ["postgres", "mysql"], indirect=True)
def test_server_listens_on_loopback_only(server: Server) -> None:
    if server.dialect == "postgres":
        rows = server.admin_execute("SHOW listen_addresses")
    else:
        rows = server.admin_execute("SELECT @@bind_address")
    assert server.host == "127.0.0.1"
    if server.managed:
        assert rows[0][0] == "127.0.0.1"


@pytest.mark.mysql
def test_mariadb_settings(mysql_server: Server) -> None:
    ((packet,),) = mysql_server.admin_execute("SELECT @@max_allowed_packet")
    assert int(packet) >= 32 * 1024 * 1024
    ((charset, collation),) = mysql_server.admin_execute(
        "SELECT default_character_set_name, default_collation_name"
        " FROM information_schema.schemata WHERE schema_name = %s",
        (mysql_server.database,),
    )
    assert (charset, collation) == ("utf8mb4", "utf8mb4_bin")


@pytest.mark.parametrize("dialect", ["mysql"], indirect=True)
def test_mariadb_accepts_17mb_values(database: peewee.Database) -> None:
    big = '{"k": "' + "x" * (17 * 1024 * 1024) + '"}'
    with database.connection_context():
        database.execute_sql("CREATE TABLE big (v LONGTEXT)")
        database.execute_sql("INSERT INTO big VALUES (%s)", (big,))
        assert database.execute_sql("SELECT LENGTH(v) FROM big").fetchone()[0] == len(
            big
        )


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "crash"])
@pytest.mark.parametrize("dialect", ["postgres", "mysql"], indirect=True)
def test_restart_keeps_data(
    server: Server, database: peewee.Database, crash: bool
) -> None:
    if not server.managed:
        pytest.skip("server given by URL; cannot restart it")
    database.connect()
    database.execute_sql("CREATE TABLE kept (x INT)")
    database.execute_sql("INSERT INTO kept VALUES (42)")
    old_pid = server.pid
    server.restart(crash=crash)
    assert server.pid != old_pid
    with pytest.raises(peewee.PeeweeException):  # the old connection is dead
        database.execute_sql("SELECT x FROM kept")
    with contextlib.suppress(peewee.PeeweeException):
        database.close()  # resets peewee's state even when it raises
    database.connect()
    assert database.execute_sql("SELECT x FROM kept").fetchone()[0] == 42
