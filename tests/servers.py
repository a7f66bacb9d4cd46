"""Throwaway PostgreSQL and MariaDB servers for the test suite.

No pytest in here: the functions can be used from a REPL or a script too::

    from tests.servers import start_postgres
    srv = start_postgres()
    print(srv.url)          # postgresql://bap:...@127.0.0.1:PORT/bap_test
    srv.stop()

Each server runs from a fresh data directory under the system temp dir,
listens on 127.0.0.1 only (plus a unix socket inside its directory), and is
tuned for speed, not durability.  ``Server.stop()`` signals the server by
pid, waits for it and removes its directory.

When running as root the servers run as the ``postgres`` / ``mysql`` system
users (PostgreSQL refuses to run as root).  Binaries are found in
``/usr/lib/postgresql/*/bin`` (newest first), on PATH and in ``/usr/sbin``;
``BAP_PG_BINDIR`` (a directory) and ``BAP_MARIADB_BINDIR`` (a PATH-style
list) override the search.  If the test process is killed, the kernel stops
its servers (PR_SET_PDEATHSIG) and the next start removes their directories.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "Server",
    "ServerError",
    "server_from_url",
    "start_mariadb",
    "start_postgres",
]

STARTUP_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """A test server could not be set up, started or stopped."""


@dataclasses.dataclass
class Server:
    """A database server the tests can connect to.

    ``user``/``password`` own ``database``; ``admin_user``/``admin_password``
    are a superuser (root on MariaDB) for fixture housekeeping.  For servers
    given by URL (``server_from_url``) admin is the same account and
    ``pid`` is None: we neither stop nor restart those.
    """

    dialect: str  # "postgres" or "mysql"
    host: str
    port: int
    user: str
    password: str
    database: str
    pid: int | None = None
    admin_user: str = ""
    admin_password: str = ""
    directory: Path | None = None  # data + socket + log; removed by stop()
    startup_seconds: float = 0.0  # wall time of start_*() (init + launch + setup)
    last_launch_seconds: float = 0.0  # launch-to-ready time of the last (re)start
    _proc: subprocess.Popen | None = dataclasses.field(default=None, repr=False)
    _launch: Callable[[Server], None] | None = dataclasses.field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        if not self.admin_user:
            self.admin_user, self.admin_password = self.user, self.password

    # -- descriptions -----------------------------------------------------

    @property
    def url(self) -> str:
        """URL in playhouse.db_url form (``postgresql://`` or ``mysql://``)."""
        scheme = "postgresql" if self.dialect == "postgres" else "mysql"
        return (
            f"{scheme}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
        )

    @property
    def managed(self) -> bool:
        """True when this process started the server (so it may stop it)."""
        return self._launch is not None

    @property
    def log_path(self) -> Path | None:
        """The server's log file, for managed servers."""
        return self.directory / "server.log" if self.directory else None

    def connect_kwargs(self, database: str | None = None) -> dict[str, Any]:
        """Keyword arguments for peewee's database class / the DB-API driver."""
        kw: dict[str, Any] = {
            "database": database or self.database,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
        }
        if self.dialect == "mysql":
            kw["charset"] = "utf8mb4"
        return kw

    # -- raw connections --------------------------------------------------

    def connect(self, admin: bool = False, database: str | None = None) -> Any:
        """A raw autocommit DB-API connection (psycopg2 or pymysql)."""
        user, password = (
            (self.admin_user, self.admin_password)
            if admin
            else (self.user, self.password)
        )
        database = database or self.database
        if self.dialect == "postgres":
            import psycopg2  # type: ignore[import-untyped]

            conn = psycopg2.connect(
                host=self.host,
                port=self.port,
                user=user,
                password=password,
                dbname=database,
                connect_timeout=5,
            )
            conn.autocommit = True
            return conn
        import pymysql  # type: ignore[import-untyped]

        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=user,
            password=password,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=5,
        )

    def admin_execute(
        self, sql: str, params: Any = None, database: str | None = None
    ) -> list[tuple]:
        """Run one statement as the admin user (autocommit); return its rows."""
        conn = self.connect(admin=True, database=database)
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> Server:
        """Create another empty database owned by ``user``; return a view on it."""
        if self.dialect == "postgres":
            self.admin_execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        else:
            self.admin_execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            )
            if self.admin_user != self.user:
                for host in ("127.0.0.1", "localhost"):
                    self.admin_execute(
                        f"GRANT ALL PRIVILEGES ON `{name}`.* TO %s@%s",
                        (self.user, host),
                    )
        return dataclasses.replace(self, database=name, _launch=None, _proc=None)

    def drop_database(self, name: str) -> None:
        """Drop a database made by ``create_database`` (closing its sessions)."""
        if self.dialect == "postgres":
            self.admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            self.admin_execute(f"DROP DATABASE IF EXISTS `{name}`")

    # -- lifecycle --------------------------------------------------------

    def stop(self) -> None:
        """Shut the server down (by pid), wait for it and remove its directory.

        Idempotent; a no-op for servers we did not start.
        """
        if not self.managed:
            return
        self._shutdown()
        self._launch = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self, crash: bool = False) -> None:
        """Shut down and start again on the same port and data dir.

        Clean (fast) shutdown by default; ``crash=True`` kills the server
        instead (PostgreSQL immediate shutdown, MariaDB SIGKILL), so the start
        runs crash recovery.  Client connections are broken either way.
        """
        if not self.managed:
            raise ServerError(f"cannot restart {self.dialect} server we did not start")
        self._shutdown(crash)
        assert self._launch is not None
        self._launch(self)

    def _shutdown(self, crash: bool = False) -> None:
        if self.pid is None:
            return
        if self.dialect == "postgres":  # SIGINT = fast, SIGQUIT = immediate
            sig = signal.SIGQUIT if crash else signal.SIGINT
        else:
            sig = signal.SIGKILL if crash else signal.SIGTERM
        _signal(self.pid, sig)
        if not _wait_exit(self.pid, self._proc, SHUTDOWN_TIMEOUT):
            _signal(self.pid, signal.SIGKILL)
            _wait_exit(self.pid, self._proc, 10)
        self.pid, self._proc = None, None


# ---------------------------------------------------------------------------
# PostgreSQL


def start_postgres(
    workdir: Path | None = None, settings: dict[str, str] | None = None
) -> Server:
    """Initialise and start a throwaway PostgreSQL cluster.

    The cluster lives in a fresh directory under ``workdir`` (default: the
    system temp dir; it must be traversable by the ``postgres`` user when
    running as root).  A role ``bap`` with a random password owns database
    ``bap_test``; the superuser is ``postgres`` (also with a password).
    ``settings`` (name -> value) are passed as ``-c name=value`` after ours.
    """
    t0 = time.monotonic()
    bindir = _pg_bindir()
    run_as = _service_user("postgres")
    directory = _make_dir(workdir, "bap-pg-", run_as)
    data, sock = directory / "data", directory / "sock"
    srv = Server(
        dialect="postgres",
        host="127.0.0.1",
        port=0,
        user="bap",
        password=_password(),
        database="bap_test",
        admin_user="postgres",
        admin_password=_password(),
        directory=directory,
    )
    try:
        sock.mkdir()
        _chown(sock, run_as)
        pwfile = directory / "pwfile"
        pwfile.write_text(srv.admin_password + "\n")
        _chown(pwfile, run_as)
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            run_as,
            directory / "initdb.log",
        )
        pwfile.unlink()

        def launch(s: Server) -> None:
            argv = [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(s.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={sock}",
                "-c",
                "fsync=off",
                # synchronous_commit stays ON: with fsync=off it costs only a
                # write() per commit, while OFF loses acknowledged commits when
                # the server process is killed (restart(crash=True)).
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
                "-c",
                "dynamic_shared_memory_type=mmap",  # small /dev/shm in containers
                "-c",
                "logging_collector=off",
            ]
            for name, value in (settings or {}).items():
                argv += ["-c", f"{name}={value}"]
            _launch_and_wait(s, argv, run_as, _postgres_ready)

        _start_on_free_port(srv, launch)
        srv.admin_execute(
            f"CREATE ROLE {srv.user} LOGIN PASSWORD %s",
            (srv.password,),
            database="postgres",
        )
        srv.admin_execute(
            f"CREATE DATABASE {srv.database} OWNER {srv.user}", database="postgres"
        )
    except BaseException:
        _discard(srv)
        raise
    srv.startup_seconds = time.monotonic() - t0
    return srv


def _postgres_ready(s: Server) -> bool:
    import psycopg2  # type: ignore[import-untyped]

    try:
        psycopg2.connect(
            host=s.host,
            port=s.port,
            user=s.admin_user,
            password=s.admin_password,
            dbname="postgres",
            connect_timeout=2,
        ).close()
        return True
    except psycopg2.OperationalError:
        return False


def _pg_bindir() -> Path:
    env = os.environ.get("BAP_PG_BINDIR")
    if env:
        if not (Path(env) / "postgres").exists():
            raise ServerError(f"BAP_PG_BINDIR={env}: no postgres binary there")
        return Path(env)
    candidates = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    which = shutil.which("postgres")
    if which:
        candidates.append(Path(which).parent)
    for c in candidates:
        if (c / "postgres").exists() and (c / "initdb").exists():
            return c
    raise ServerError(
        "PostgreSQL server binaries not found (looked in BAP_PG_BINDIR, "
        "/usr/lib/postgresql/*/bin, PATH); install e.g. `apt-get install postgresql-15`"
    )


# ---------------------------------------------------------------------------
# MariaDB


def start_mariadb(
    workdir: Path | None = None, settings: dict[str, str] | None = None
) -> Server:
    """Initialise and start a throwaway MariaDB server.

    Database ``bap_test`` (utf8mb4 / utf8mb4_bin) and user ``bap`` with a
    random password and all privileges on it from 127.0.0.1 and localhost;
    admin is ``root`` with a random password.  ``max_allowed_packet`` is 256M.
    ``settings`` (name -> value) are passed as ``--name=value`` after ours
    (the last one wins), to the server only.
    """
    t0 = time.monotonic()
    mariadbd, install_db = _mariadb_binaries()
    run_as = _service_user("mysql")
    directory = _make_dir(workdir, "bap-my-", run_as)
    data, sock = directory / "data", directory / "mysqld.sock"
    srv = Server(
        dialect="mysql",
        host="127.0.0.1",
        port=0,
        user="bap",
        password=_password(),
        database="bap_test",
        admin_user="root",
        admin_password=_password(),
        directory=directory,
    )
    # Server options shared by bootstrap and the real server.
    common = [
        "--skip-log-bin",
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_bin",
        "--innodb-buffer-pool-size=256M",
        "--innodb-log-file-size=64M",
        "--innodb-flush-log-at-trx-commit=2",
        "--innodb-doublewrite=0",
        "--skip-name-resolve",
    ]
    try:
        _run(
            [
                str(install_db),
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                f"--tmpdir={directory}",
                *common,
            ],
            run_as,
            directory / "install-db.log",
        )

        def launch(s: Server) -> None:
            argv = [
                str(mariadbd),
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={sock}",
                f"--port={s.port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={directory / 'mysqld.pid'}",
                f"--log-error={directory / 'server.log'}",
                f"--tmpdir={directory}",
                "--max-allowed-packet=256M",
                "--max-connections=200",
                *common,
                *(f"--{name}={value}" for name, value in (settings or {}).items()),
            ]
            _launch_and_wait(s, argv, run_as, _mariadb_ready)

        _start_on_free_port(srv, launch)
        # Right after install root@localhost has no password (socket only).
        _mariadb_bootstrap_sql(
            sock,
            [
                "ALTER USER root@localhost IDENTIFIED BY %s",
                "CREATE USER IF NOT EXISTS root@'127.0.0.1'",
                "ALTER USER root@'127.0.0.1' IDENTIFIED BY %s",
                "GRANT ALL PRIVILEGES ON *.* TO root@'127.0.0.1' WITH GRANT OPTION",
                f"CREATE DATABASE `{srv.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                f"CREATE USER {srv.user}@'127.0.0.1' IDENTIFIED BY %s",
                f"CREATE USER {srv.user}@'localhost' IDENTIFIED BY %s",
                f"GRANT ALL PRIVILEGES ON `{srv.database}`.* TO {srv.user}@'127.0.0.1'",
                f"GRANT ALL PRIVILEGES ON `{srv.database}`.* TO {srv.user}@'localhost'",
            ],
            [
                srv.admin_password,
                None,
                srv.admin_password,
                None,
                None,
                srv.password,
                srv.password,
                None,
                None,
            ],
        )
    except BaseException:
        _discard(srv)
        raise
    srv.startup_seconds = time.monotonic() - t0
    return srv


def _mariadb_bootstrap_sql(sock: Path, statements: list[str], params: list) -> None:
    import pymysql  # type: ignore[import-untyped]

    conn = pymysql.connect(unix_socket=str(sock), user="root", autocommit=True)
    try:
        cur = conn.cursor()
        for sql, p in zip(statements, params):
            cur.execute(sql, None if p is None else (p,))
        # install-db also makes password-less root@::1 and root@<hostname>.
        cur.execute(
            "SELECT host FROM mysql.user WHERE user = 'root'"
            " AND host NOT IN ('localhost', '127.0.0.1')"
        )
        for (host,) in cur.fetchall():
            cur.execute("DROP USER root@%s", (host,))
    finally:
        conn.close()


def _mariadb_ready(s: Server) -> bool:
    """True once the server sends its handshake on the TCP port.

    A raw socket, not pymysql: pymysql leaks its socket when connect() fails.
    """
    try:
        with socket.create_connection((s.host, s.port), timeout=2) as conn:
            return len(conn.recv(16)) > 0
    except OSError:
        return False


def _mariadb_binaries() -> tuple[Path, Path]:
    path = os.environ.get("BAP_MARIADB_BINDIR") or os.pathsep.join(
        [
            os.environ.get("PATH", ""),
            "/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin",
        ]
    )
    server = shutil.which("mariadbd", path=path) or shutil.which("mysqld", path=path)
    install = shutil.which("mariadb-install-db", path=path) or shutil.which(
        "mysql_install_db", path=path
    )
    if not server or not install:
        raise ServerError(
            f"MariaDB server binaries (mariadbd, mariadb-install-db) not found in "
            f"{path}; install them with `apt-get install mariadb-server`"
        )
    return Path(server), Path(install)


# ---------------------------------------------------------------------------
# Servers given by URL


def server_from_url(url: str) -> Server:
    """Describe an existing server from a ``postgresql://`` or ``mysql://`` URL.

    The URL's user must own the database; it is also used as admin.  The
    returned Server is not managed: ``stop()`` does nothing and ``restart()``
    raises.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme in ("postgres", "postgresql"):
        dialect, default_port = "postgres", 5432
    elif scheme in ("mysql", "mariadb"):
        dialect, default_port = "mysql", 3306
    else:
        raise ValueError(f"unsupported database URL scheme {parts.scheme!r}: {url}")
    database = unquote(parts.path.lstrip("/"))
    if not database or not parts.username:
        raise ValueError(f"database URL needs a user and a database name: {url}")
    return Server(
        dialect=dialect,
        host=parts.hostname or "127.0.0.1",
        port=parts.port or default_port,
        user=unquote(parts.username),
        password=unquote(parts.password or ""),
        database=database,
    )


# ---------------------------------------------------------------------------
# Helpers


def _start_on_free_port(srv: Server, launch: Callable[[Server], None]) -> None:
    """Pick a free port and launch; retry if another process grabbed it."""
    for attempt in range(3):
        srv.port = _free_port()
        try:
            launch(srv)
            srv._launch = launch
            return
        except ServerError as e:
            if attempt == 2 or not _port_clash(str(e)):
                raise


def _port_clash(message: str) -> bool:
    return any(
        s in message
        for s in ("Address already in use", "could not bind", "Bind on TCP/IP port")
    )


def _launch_and_wait(
    s: Server, argv: list[str], run_as: str | None, ready: Callable[[Server], bool]
) -> None:
    """Start ``argv`` as the server process and poll ``ready`` until it's up."""
    t0 = time.monotonic()
    assert s.directory is not None
    log = s.directory / "server.log"
    sig = signal.SIGINT if s.dialect == "postgres" else signal.SIGTERM
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=s.directory,
            start_new_session=True,
            preexec_fn=_die_with_parent(sig),  # noqa: PLW1509 (only calls prctl)
            **_as_user(run_as),
        )
    s.pid, s._proc = proc.pid, proc
    deadline = t0 + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            s.pid, s._proc = None, None
            raise ServerError(
                f"{s.dialect} server exited with code {proc.returncode} during "
                f"startup on port {s.port}.\n--- {log.name}, last lines ---\n{_tail(log)}"
            )
        if ready(s):
            s.last_launch_seconds = time.monotonic() - t0
            return
        if time.monotonic() > deadline:
            s._shutdown()
            raise ServerError(
                f"{s.dialect} server did not accept connections within "
                f"{STARTUP_TIMEOUT:.0f}s on port {s.port}.\n"
                f"--- {log.name}, last lines ---\n{_tail(log)}"
            )
        time.sleep(0.05)


def _run(argv: list[str], run_as: str | None, log: Path) -> None:
    """Run a setup command (initdb, install-db); raise with its output on failure."""
    with open(log, "ab") as out:
        proc = subprocess.run(
            argv,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            timeout=300,
            **_as_user(run_as),
        )
    if proc.returncode != 0:
        raise ServerError(
            f"{Path(argv[0]).name} failed with exit code {proc.returncode}.\n"
            f"command: {' '.join(argv)}\n--- {log.name}, last lines ---\n{_tail(log)}"
        )


def _service_user(name: str) -> str | None:
    """The account to run the server as: ``name`` when root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam(name)
    except KeyError:
        raise ServerError(
            f"running as root but system user {name!r} does not exist; it is "
            f"created by the server package (or: useradd --system {name})"
        ) from None
    return name


def _as_user(run_as: str | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    import pwd

    pw = pwd.getpwnam(run_as)
    return {
        "user": pw.pw_uid,
        "group": pw.pw_gid,
        "extra_groups": [],
        "env": {**os.environ, "HOME": pw.pw_dir, "USER": run_as, "LOGNAME": run_as},
    }


def _make_dir(workdir: Path | None, prefix: str, run_as: str | None) -> Path:
    _sweep_stale(Path(workdir or tempfile.gettempdir()), prefix)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir)).resolve()
    (directory / "owner.pid").write_text(str(os.getpid()))
    _chown(directory, run_as)
    if run_as is not None:
        probe = subprocess.run(
            ["test", "-w", str(directory)], check=False, **_as_user(run_as)
        )
        if probe.returncode != 0:
            shutil.rmtree(directory, ignore_errors=True)
            raise ServerError(
                f"user {run_as!r} cannot write {directory}: a parent directory is "
                f"not traversable by it; use a workdir like /tmp"
            )
    return directory


def _sweep_stale(parent: Path, prefix: str) -> None:
    """Remove server dirs left behind by test processes that were killed."""
    for d in parent.glob(prefix + "*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _alive(owner):
            continue
        server_pids = []
        for pidfile in (d / "data" / "postmaster.pid", d / "mysqld.pid"):
            try:
                server_pids.append(int(pidfile.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        if not any(_alive(p) for p in server_pids):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _chown(path: Path, run_as: str | None) -> None:
    if run_as is not None:
        shutil.chown(path, run_as, run_as)


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """preexec_fn: have the kernel signal the server if the test process dies.

    A safety net against stray servers when pytest is SIGKILLed.  It runs after
    Popen switched user, so the setting survives.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def _discard(srv: Server) -> None:
    """Clean up after a failed start: kill the process, remove the directory."""
    srv._launch = None
    try:
        srv._shutdown()
    finally:
        if srv.directory is not None:
            shutil.rmtree(srv.directory, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_exit(pid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _password() -> str:
    return secrets.token_hex(12)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _version_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))
