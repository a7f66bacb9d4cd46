"""Where the benchmark runs: servers, connections (adapter and raw driver) and machine facts."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import tempfile
from typing import Any, Dict, Iterator, Optional

import peewee

from better_agent_peewee import create_tables, drop_tables, peewee_storage

#: Environment variables naming existing servers (their five tables are dropped and recreated).
URL_VARIABLES = {"postgres": "BAP_BENCH_POSTGRES_URL", "mysql": "BAP_BENCH_MYSQL_URL"}

#: Durability settings of what the benchmark runs on (both sides share them).
SETTINGS = {
    "sqlite": "temp file; journal_mode=WAL, foreign_keys=ON, synchronous=FULL (the default)",
    "postgres": "throwaway server (tests/servers.py): fsync=off, full_page_writes=off, synchronous_commit=on",
    "mysql": "throwaway server (tests/servers.py): innodb_flush_log_at_trx_commit=2, innodb_doublewrite=0, "
             "no binary log",
}


class Target:
    """One database to benchmark on: the adapter's storage and a raw driver connection to it.

    Both sides use the same database and the same tables, so they see the same data sizes.
    """

    def __init__(self, dialect: str, url: str, server: Any = None, sqlite_path: Optional[str] = None) -> None:
        self.dialect = dialect
        #: playhouse.db_url form, for subprocesses (W10).
        self.url = url
        self.server = server
        self.sqlite_path = sqlite_path
        self.database = self._peewee_database()
        drop_tables(self.database)
        create_tables(self.database)
        self.storage = peewee_storage(self.database)
        self.raw = self.connect_raw()
        self.is_mariadb = False
        self.server_version = self._server_version()
        managed = server is None or server.managed
        self.settings = SETTINGS[dialect] if managed else f"existing server ({URL_VARIABLES[dialect]})"

    def _peewee_database(self) -> peewee.Database:
        if self.dialect == "sqlite":
            return peewee.SqliteDatabase(self.sqlite_path)
        kwargs = self.server.connect_kwargs()
        name = kwargs.pop("database")
        cls = peewee.PostgresqlDatabase if self.dialect == "postgres" else peewee.MySQLDatabase
        return cls(name, **kwargs)

    def connect_raw(self) -> Any:
        """A raw DB-API connection in autocommit mode, set up like the adapter's (WAL, foreign keys)."""
        if self.dialect == "sqlite":
            # peewee opens SQLite with isolation_level=None (autocommit) and a 5 s busy timeout.
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None, timeout=5, check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = 1")
            conn.execute("PRAGMA journal_mode = wal")
            return conn
        return self.server.connect()  # autocommit psycopg2 / pymysql (utf8mb4)

    def _server_version(self) -> str:
        if self.dialect == "sqlite":
            return f"SQLite {sqlite3.sqlite_version}"
        cur = self.raw.cursor()
        cur.execute("SELECT VERSION()" if self.dialect == "mysql" else "SHOW server_version")
        version = str(cur.fetchone()[0])
        if self.dialect == "mysql":
            self.is_mariadb = "mariadb" in version.lower()
            return ("MariaDB " if self.is_mariadb else "MySQL ") + version
        return f"PostgreSQL {version}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()
        with contextlib.suppress(Exception):
            self.database.close()


@contextlib.contextmanager
def open_target(dialect: str, log: Any = print,
                settings: Optional[Dict[str, str]] = None) -> Iterator[Target]:
    """A fresh `Target` for `dialect`: a temp SQLite file, a throwaway server, or a URL from the env.

    Servers this process starts are stopped (by pid) on the way out, Ctrl-C included.
    `settings` (name -> value) go to a throwaway server's command line, after the tests' own.
    """
    if dialect == "sqlite":
        directory = tempfile.mkdtemp(prefix="bap-bench-")
        path = os.path.join(directory, "bench.db")
        target = Target("sqlite", f"sqlite:///{path}", sqlite_path=path)
        try:
            yield target
        finally:
            target.close()
            shutil.rmtree(directory, ignore_errors=True)
        return

    from tests.servers import server_from_url, start_mariadb, start_postgres

    url = os.environ.get(URL_VARIABLES[dialect])
    if url:
        server = server_from_url(url)
    else:
        log(f"starting a throwaway {dialect} server ...")
        server = (start_postgres if dialect == "postgres" else start_mariadb)(settings=settings)
    try:
        full_url = server.url + ("?charset=utf8mb4" if dialect == "mysql" else "")
        target = Target(dialect, full_url, server=server)
        try:
            yield target
        finally:
            target.close()
    finally:
        server.stop()  # no-op for a server given by URL


def machine() -> Dict[str, Any]:
    """CPU, cores, memory, OS and library versions of this process's machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    memory = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    versions: Dict[str, Any] = {"python": platform.python_version(), "peewee": peewee.__version__,
                                "sqlite3 library": sqlite3.sqlite_version}
    for module in ("psycopg2", "pymysql"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__.split(" ")[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory": memory,
            "os": platform.platform(), "versions": versions}


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(path: Optional[str], name: str, payload: Dict[str, Any]) -> str:
    """Write `payload` as JSON, stamped with the time, to `path` (or bench/results/<stamp>-<name>.json)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = path or os.path.join(RESULTS, f"{stamp}-{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"generated": stamp, **payload}, f, indent=1)
    return path
