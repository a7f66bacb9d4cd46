"""Test fixtures: one empty database per test on SQLite, PostgreSQL and MariaDB.

Environment:

* ``BAP_TEST_DIALECTS`` -- comma list of dialects to run (default
  ``sqlite,postgres,mysql``).  Tests of the other dialects are skipped; this is
  the ONLY way a dialect gets skipped.  A server that cannot be started makes
  its tests error, never skip.
* ``BAP_TEST_POSTGRES_URL`` / ``BAP_TEST_MYSQL_URL`` -- use an existing server
  (``postgresql://user:pw@host:port/db``, ``mysql://...``) instead of starting
  a throwaway one.  Its database is wiped before every test.
* ``BAP_TEST_PG_DRIVER=psycopg3`` -- PostgreSQL databases use psycopg 3 (with its
  prepared statements off, as pgbouncer's transaction mode needs) instead of psycopg2.
* ``BAP_TEST_TMPFS=0`` -- keep the throwaway servers' data and ``tmp_path`` (the SQLite
  files) on the disk's temporary directory.  By default they go to ``/dev/shm`` when it is a
  tmpfs with room (`tmpfs_dir`): every test creates and drops tables, and on a disk those
  fsyncs were most of the suite's time (MariaDB's CREATE INDEX about 60 ms each, SQLite's
  commits).  Nothing the tests check depends on it: a killed process loses nothing on either.

The cluster suite (tests/cluster_suite, marker ``cluster``) starts replicated topologies
and runs only with ``--cluster``; without it those tests are deselected.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import peewee
import pytest

from tests.servers import Server, server_from_url, start_mariadb, start_postgres

DIALECTS = ("sqlite", "postgres", "mysql")

_started: list[Server] = []  # managed servers, for the terminal summary


def selected_dialects() -> set[str]:
    """Dialects named in ``BAP_TEST_DIALECTS`` (all of them by default)."""
    raw = os.environ.get("BAP_TEST_DIALECTS", ",".join(DIALECTS))
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    unknown = names - set(DIALECTS)
    if unknown:
        raise pytest.UsageError(
            f"BAP_TEST_DIALECTS: unknown dialect(s) {sorted(unknown)}; "
            f"choose from {', '.join(DIALECTS)}"
        )
    return names


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", action="store_true", default=False,
                     help="run the cluster suite (tests/cluster_suite): Galera, standby, pgbouncer")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The cluster suite is a separate run (.ci/run): deselected, not skipped, in the default one.
    if config.getoption("--cluster"):
        return
    keep = [item for item in items if not item.get_closest_marker("cluster")]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("cluster")])
        items[:] = keep


def pg_driver_options() -> dict[str, object]:
    """Connect options of the PostgreSQL driver chosen by ``BAP_TEST_PG_DRIVER``."""
    driver = os.environ.get("BAP_TEST_PG_DRIVER", "psycopg2").lower()
    if driver == "psycopg3":
        return {"prefer_psycopg3": True, "prepare_threshold": None}
    if driver != "psycopg2":
        raise pytest.UsageError(f"BAP_TEST_PG_DRIVER: {driver!r}; choose psycopg2 or psycopg3")
    return {}


#: Free space /dev/shm must have to hold the servers' data and tmp_path (they use about 200 MB).
TMPFS_ROOM = 2 * 1024**3


def tmpfs_dir() -> Path | None:
    """``/dev/shm`` when it is a writable tmpfs with `TMPFS_ROOM` free and ``BAP_TEST_TMPFS``
    is not ``0``, else None (the disk's temporary directory; a container's /dev/shm is often 64 MB)."""
    if os.environ.get("BAP_TEST_TMPFS", "1") == "0":
        return None
    shm = Path("/dev/shm")
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            tmpfs = any(f[1] == str(shm) and f[2] == "tmpfs" for f in (line.split() for line in mounts))
        roomy = shutil.disk_usage(shm).free >= TMPFS_ROOM
    except OSError:
        return None
    return shm if tmpfs and roomy and os.access(shm, os.W_OK | os.X_OK) else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: cluster suite test (runs with --cluster)")
    # tmp_path (the SQLite test files) on tmpfs, unless --basetemp or the variable says where.
    # pytest reads PYTEST_DEBUG_TEMPROOT when a test first asks for tmp_path, after this hook.
    shm = tmpfs_dir()
    if shm is not None and config.option.basetemp is None and "PYTEST_DEBUG_TEMPROOT" not in os.environ:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(shm)
    for name in DIALECTS:
        config.addinivalue_line("markers", f"{name}: test runs against {name}")
    config.addinivalue_line("markers", "slow: slow test")
    selected_dialects()  # fail early on a typo


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip tests of the dialects excluded by BAP_TEST_DIALECTS."""
    selected = selected_dialects()
    for name in DIALECTS:
        if name not in selected and item.get_closest_marker(name):
            pytest.skip(f"{name} excluded by BAP_TEST_DIALECTS")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    # Per dialect, so a run shows at a glance that PostgreSQL and MariaDB really ran.
    counts: dict[str, dict[str, int]] = {d: {} for d in DIALECTS}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call" and outcome == "passed":
                continue
            for name in DIALECTS:
                if name in getattr(report, "keywords", {}):
                    counts[name][outcome] = counts[name].get(outcome, 0) + 1
    for name in DIALECTS:
        found = ", ".join(f"{n} {o}" for o, n in counts[name].items()) or "no tests"
        terminalreporter.write_line(f"dialect {name}: {found}")
    for srv in _started:
        terminalreporter.write_line(
            f"test server {srv.dialect}: started in {srv.startup_seconds:.2f}s"
            f" (last launch {srv.last_launch_seconds:.2f}s)"
        )


# -- servers ------------------------------------------------------------------


def _session_server(dialect: str, start: Callable[[], Server]) -> Iterator[Server]:
    if dialect not in selected_dialects():
        pytest.skip(f"{dialect} excluded by BAP_TEST_DIALECTS")
    url = os.environ.get(f"BAP_TEST_{dialect.upper()}_URL")
    if url:
        yield server_from_url(url)
        return
    srv = start()  # raises (-> test errors) if the server cannot start
    atexit.register(srv.stop)  # safety net; stop() is idempotent
    _started.append(srv)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """The session's PostgreSQL server (started on first use)."""
    yield from _session_server("postgres", lambda: start_postgres(tmpfs_dir()))


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[Server]:
    """The session's MariaDB server (started on first use)."""
    yield from _session_server("mysql", lambda: start_mariadb(tmpfs_dir()))


@pytest.fixture(
    params=[pytest.param(d, marks=getattr(pytest.mark, d), id=d) for d in DIALECTS]
)
def dialect(request: pytest.FixtureRequest) -> str:
    """``"sqlite"``, ``"postgres"`` or ``"mysql"``; tests using it run once per dialect."""
    return request.param


@pytest.fixture
def server(dialect: str, request: pytest.FixtureRequest) -> Server | None:
    """The Server for the current dialect (None for sqlite)."""
    if dialect == "sqlite":
        return None
    return request.getfixturevalue(f"{dialect}_server")


# -- empty databases ----------------------------------------------------------


def reset_database(srv: Server) -> None:
    """Drop everything in the server's test database and kill its other sessions."""
    conn = srv.connect(admin=True)
    try:
        cur = conn.cursor()
        if srv.dialect == "postgres":
            cur.execute("SET lock_timeout = '10s'")
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            cur.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = 'public'"
                " OR nspowner = (SELECT oid FROM pg_roles WHERE rolname = %s)",
                (srv.user,),
            )
            for (schema,) in cur.fetchall():
                cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
            cur.execute(f'CREATE SCHEMA public AUTHORIZATION "{srv.user}"')
            cur.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
        else:
            cur.execute("SET SESSION lock_wait_timeout = 10")
            cur.execute(
                "SELECT id FROM information_schema.processlist"
                " WHERE db = %s AND id <> CONNECTION_ID()",
                (srv.database,),
            )
            for (thread_id,) in cur.fetchall():
                with contextlib.suppress(Exception):  # may have just gone
                    cur.execute(f"KILL {int(thread_id)}")
            cur.execute("SET FOREIGN_KEY_CHECKS = 0")
            cur.execute(
                "SELECT table_name, table_type FROM information_schema.tables"
                " WHERE table_schema = %s",
                (srv.database,),
            )
            for name, kind in cur.fetchall():
                what = "VIEW" if kind == "VIEW" else "TABLE"
                cur.execute(f"DROP {what} IF EXISTS `{srv.database}`.`{name}`")
    finally:
        conn.close()


def close_database(db: peewee.Database) -> None:
    """Close ``db``'s connection(s), even mid-transaction or after a restart."""
    try:
        db.close_all() if hasattr(db, "close_all") else db.close()  # pools: all
        return
    except peewee.PeeweeException:  # e.g. "transaction is open"
        pass
    if not db.is_closed():  # close() refuses while a transaction is open
        conn = db.connection()
        db.dispose()
        with contextlib.suppress(Exception):
            conn.close()


@pytest.fixture
def _empty_database(
    dialect: str, tmp_path: Path, server: Server | None
) -> Server | None:
    """Wipe the dialect's test database once per test (sqlite: fresh tmp file)."""
    if server is not None:
        reset_database(server)
    return server


@pytest.fixture
def make_database(
    dialect: str, tmp_path: Path, _empty_database: Server | None
) -> Iterator[Callable[..., peewee.Database]]:
    """Factory: ``make_database(cls=None, **kwargs)`` -> a new Peewee database
    object on this test's (empty) database.  ``cls`` defaults to
    SqliteDatabase / PostgresqlDatabase / MySQLDatabase; kwargs go to it.
    All objects made are closed after the test.
    """
    made: list[peewee.Database] = []

    def make(cls: type | None = None, **kwargs) -> peewee.Database:  # type: ignore[no-untyped-def]
        srv = _empty_database
        if srv is None:
            db = (cls or peewee.SqliteDatabase)(str(tmp_path / "test.db"), **kwargs)
        else:
            default = (
                peewee.PostgresqlDatabase
                if dialect == "postgres"
                else peewee.MySQLDatabase
            )
            params = srv.connect_kwargs()
            if dialect == "postgres":
                params.update(pg_driver_options())
            params.update(kwargs)
            db = (cls or default)(params.pop("database"), **params)
        made.append(db)
        return db

    yield make
    for db in made:
        close_database(db)


@pytest.fixture
def database(make_database: Callable[..., peewee.Database]) -> peewee.Database:
    """An unconnected Peewee database for the current dialect, empty at test start."""
    return make_database()


@pytest.fixture
def database_url(dialect: str, tmp_path: Path, _empty_database: Server | None) -> str:
    """playhouse.db_url URL of the same empty database (for subprocesses)."""
    if _empty_database is None:
        return f"sqlite:///{(tmp_path / 'test.db').resolve()}"  # sqlite:////abs/...
    if dialect == "mysql":
        return _empty_database.url + "?charset=utf8mb4"
    return _empty_database.url
