"""Throwaway replicated topologies for the cluster suite, on 127.0.0.1.

Built on tests/servers.py (same throwaway directories, free ports, stop by pid,
servers that die with the test process):

* ``start_galera()`` -- a 3-node MariaDB Galera cluster (galera-4, rsync state
  transfer) with haproxy in front; ``GaleraCluster.kill(i)`` / ``rejoin(i)``.
* ``start_pg_replicated()`` -- a PostgreSQL primary with a streaming standby that
  becomes synchronous once attached; ``PgPair.fail_over()`` kills the primary and
  promotes the standby.
* ``start_pgbouncer(backend)`` -- pgbouncer in transaction pooling mode in front of
  a PostgreSQL server.

No pytest in here: usable from a REPL or a script (bench/cluster uses it too).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.servers import (
    STARTUP_TIMEOUT,
    Server,
    ServerError,
    _as_user,
    _chown,
    _die_with_parent,
    _free_port,
    _launch_and_wait,
    _make_dir,
    _mariadb_binaries,
    _mariadb_bootstrap_sql,
    _mariadb_ready,
    _password,
    _pg_bindir,
    _postgres_ready,
    _run,
    _service_user,
    _signal,
    _tail,
    _wait_exit,
    start_postgres,
)

__all__ = [
    "GALERA_PROVIDER",
    "GaleraCluster",
    "PgPair",
    "Proxy",
    "start_galera",
    "start_pg_replicated",
    "start_pgbouncer",
]

GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"

#: Galera failure detection tuned for a test on one machine: a killed node leaves the
#: cluster in about two seconds instead of the default five to fifteen.
_GALERA_TIMEOUTS = (
    "evs.keepalive_period=PT0.5S;evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;"
    "evs.inactive_check_period=PT0.5S;evs.install_timeout=PT4S;pc.announce_timeout=PT1S"
)


# ---------------------------------------------------------------------------
# A proxy process (haproxy, pgbouncer): a Server whose pid is the proxy's


@dataclasses.dataclass
class Proxy:
    """A proxy process listening on ``port``; ``server`` describes connecting through it."""

    server: Server
    pid: int | None
    proc: subprocess.Popen[bytes] | None
    directory: Path
    name: str
    argv: list[str]
    run_as: str | None
    owns_directory: bool = False

    def stop(self) -> None:
        """Stop the proxy (SIGTERM, then SIGKILL) and wait for it; remove its own directory."""
        if self.pid is not None:
            _signal(self.pid, signal.SIGTERM)
            if not _wait_exit(self.pid, self.proc, 10):
                _signal(self.pid, signal.SIGKILL)
                _wait_exit(self.pid, self.proc, 10)
            self.pid, self.proc = None, None
        if self.owns_directory:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)


def _spawn_proxy(name: str, argv: list[str], directory: Path, port: int, run_as: str | None,
                 server: Server) -> Proxy:
    log = directory / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory,
            start_new_session=True, preexec_fn=_die_with_parent(signal.SIGTERM),  # noqa: PLW1509
            **_as_user(run_as),
        )
    proxy = Proxy(server, proc.pid, proc, directory, name, argv, run_as)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    import socket

    while True:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proxy
        except OSError:
            pass
        if time.monotonic() > deadline:
            proxy.stop()
            raise ServerError(f"{name} did not listen on {port}:\n{_tail(log)}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Galera


@dataclasses.dataclass
class GaleraCluster:
    """Three MariaDB nodes replicating with Galera, and haproxy in front of them."""

    nodes: list[Server]
    haproxy: Proxy
    directory: Path
    gcomm_ports: list[int]

    @property
    def proxy(self) -> Server:
        """Connecting through haproxy (round robin over the synced nodes)."""
        return self.haproxy.server

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (its data directory stays for the rejoin)."""
        node = self.nodes[index]
        if node.pid is not None:
            _signal(node.pid, signal.SIGKILL)
            _wait_exit(node.pid, node._proc, 30)
        node.pid, node._proc = None, None

    def rejoin(self, index: int) -> None:
        """Start node `index` again; returns once it is synced with the cluster."""
        node = self.nodes[index]
        assert node._launch is not None
        node._launch(node)
        wait_synced(node)

    def sizes(self) -> list[int]:
        """wsrep_cluster_size as each running node sees it."""
        out = []
        for node in self.nodes:
            if node.pid is None:
                continue
            rows = node.admin_execute("SHOW STATUS LIKE 'wsrep_cluster_size'")
            out.append(int(rows[0][1]))
        return out

    def stop(self) -> None:
        """Stop haproxy and every node; remove the directories."""
        self.haproxy.stop()
        for node in reversed(self.nodes):
            node.stop()
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def wait_synced(node: Server, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until `node` reports wsrep_ready ON and state Synced."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            rows = dict(node.admin_execute(
                "SHOW STATUS WHERE variable_name IN ('wsrep_ready', 'wsrep_local_state_comment')"))
            last = rows
            if rows.get("wsrep_ready") == "ON" and rows.get("wsrep_local_state_comment") == "Synced":
                return
        except Exception as exc:  # starting up: refused, 1047 ...
            last = exc
        time.sleep(0.1)
    raise ServerError(f"galera node on {node.port} not synced after {timeout:.0f}s ({last}):\n"
                      f"{_tail(node.log_path) if node.log_path else ''}")


def start_galera(size: int = 3, workdir: Path | None = None, attempts: int = 3) -> GaleraCluster:
    """`_start_galera`, again on fresh ports when a port picked as free was taken meanwhile
    (other test processes start servers too; Galera needs four ports per node)."""
    for attempt in range(attempts):
        try:
            return _start_galera(size, workdir)
        except ServerError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_galera(size: int = 3, workdir: Path | None = None) -> GaleraCluster:
    """A `size`-node Galera cluster on 127.0.0.1 with haproxy in front; database ``bap_test``.

    Node 1 bootstraps the cluster and is set up (users, database) like
    `start_mariadb`; the others join with an rsync state transfer. Every node has its
    own SQL, group communication, IST and SST ports.
    """
    mariadbd, install_db = _mariadb_binaries()
    if not Path(GALERA_PROVIDER).exists():
        raise ServerError(f"{GALERA_PROVIDER} not found: install the galera-4 package")
    run_as = _service_user("mysql")
    top = _make_dir(workdir, "bap-galera-", run_as)
    user, password, admin_password = "bap", _password(), _password()
    gcomm = [_free_port() for _ in range(size)]
    address = "gcomm://" + ",".join(f"127.0.0.1:{p}" for p in gcomm)
    nodes: list[Server] = []
    proxy: Proxy | None = None
    try:
        for i in range(size):
            directory = top / f"node{i + 1}"
            directory.mkdir()
            (directory / "data").mkdir()
            _chown(directory, run_as)
            _chown(directory / "data", run_as)
            nodes.append(Server(dialect="mysql", host="127.0.0.1", port=_free_port(), user=user,
                                password=password, database="bap_test", admin_user="root",
                                admin_password=admin_password, directory=directory))
        common = [
            "--skip-log-bin", "--character-set-server=utf8mb4", "--collation-server=utf8mb4_bin",
            "--innodb-buffer-pool-size=96M", "--innodb-log-file-size=48M",
            "--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0", "--skip-name-resolve",
        ]
        first = nodes[0].directory
        assert first is not None
        _run([str(install_db), "--no-defaults", f"--datadir={first / 'data'}",
              "--auth-root-authentication-method=normal", "--skip-test-db",
              f"--tmpdir={first}", *common], run_as, top / "install-db.log")

        def launcher(i: int, ist: int, sst: int) -> Any:
            def launch(s: Server) -> None:
                assert s.directory is not None
                bootstrap = getattr(s, "_bootstrap", False)
                argv = [
                    str(mariadbd), "--no-defaults", f"--datadir={s.directory / 'data'}",
                    f"--socket={s.directory / 'mysqld.sock'}", f"--port={s.port}",
                    "--bind-address=127.0.0.1", f"--pid-file={s.directory / 'mysqld.pid'}",
                    f"--log-error={s.directory / 'server.log'}", f"--tmpdir={s.directory}",
                    "--max-allowed-packet=256M", "--max-connections=300",
                    "--max-connect-errors=1000000", *common,
                    "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2", "--default-storage-engine=InnoDB",
                    "--wsrep-on=ON", f"--wsrep-provider={GALERA_PROVIDER}",
                    "--wsrep-cluster-name=bap", f"--wsrep-cluster-address={address}",
                    f"--wsrep-node-name=node{i + 1}", f"--wsrep-node-address=127.0.0.1:{gcomm[i]}",
                    f"--wsrep-node-incoming-address=127.0.0.1:{s.port}",
                    f"--wsrep-sst-receive-address=127.0.0.1:{sst}", "--wsrep-sst-method=rsync",
                    # One applier: parallel ones hit "MDL BF-BF conflict" (a stuck node) on DDL with FKs.
                    "--wsrep-slave-threads=1",
                    f"--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{gcomm[i]};"
                    f"ist.recv_addr=127.0.0.1:{ist};gcache.size=64M;{_GALERA_TIMEOUTS}",
                ]
                if bootstrap:
                    argv.append("--wsrep-new-cluster")
                _launch_and_wait(s, argv, run_as, _mariadb_ready)
            return launch

        for i, node in enumerate(nodes):
            launch = launcher(i, _free_port(), _free_port())
            node._bootstrap = i == 0  # type: ignore[attr-defined]
            launch(node)
            node._launch = launch
            node._bootstrap = False  # type: ignore[attr-defined]
            if i == 0:
                assert node.directory is not None
                _mariadb_bootstrap_sql(node.directory / "mysqld.sock", [
                    "ALTER USER root@localhost IDENTIFIED BY %s",
                    "CREATE USER IF NOT EXISTS root@'127.0.0.1'",
                    "ALTER USER root@'127.0.0.1' IDENTIFIED BY %s",
                    "GRANT ALL PRIVILEGES ON *.* TO root@'127.0.0.1' WITH GRANT OPTION",
                    "CREATE DATABASE `bap_test` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                    f"CREATE USER {user}@'127.0.0.1' IDENTIFIED BY %s",
                    f"CREATE USER {user}@'localhost' IDENTIFIED BY %s",
                    f"GRANT ALL PRIVILEGES ON `bap_test`.* TO {user}@'127.0.0.1'",
                    f"GRANT ALL PRIVILEGES ON `bap_test`.* TO {user}@'localhost'",
                    "CREATE USER haproxy_check@'127.0.0.1'",
                ], [admin_password, None, admin_password, None, None, password, password, None, None, None])
            wait_synced(node)

        hport = _free_port()
        cfg = top / "haproxy.cfg"
        cfg.write_text("\n".join([
            "global", "    maxconn 2000",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 1h",
            "    timeout server 1h", "    retries 2", "    option redispatch",
            "frontend mysql", f"    bind 127.0.0.1:{hport}", "    default_backend galera",
            "backend galera", "    balance roundrobin", "    option mysql-check user haproxy_check post-41",
            *[f"    server node{i + 1} 127.0.0.1:{n.port} check inter 500 fall 2 rise 2 on-marked-down "
              f"shutdown-sessions" for i, n in enumerate(nodes)],
            "",
        ]))
        front = dataclasses.replace(nodes[0], port=hport, pid=None, directory=None, _launch=None, _proc=None)
        proxy = _spawn_proxy("haproxy", ["/usr/sbin/haproxy", "-db", "-f", str(cfg)], top, hport, None, front)
    except BaseException:
        if proxy is not None:
            proxy.stop()
        for node in nodes:
            node.stop()
        import shutil

        shutil.rmtree(top, ignore_errors=True)
        raise
    return GaleraCluster(nodes, proxy, top, gcomm)


# ---------------------------------------------------------------------------
# PostgreSQL: primary + synchronous standby


@dataclasses.dataclass
class PgPair:
    """A PostgreSQL primary and a streaming standby (synchronous once attached)."""

    primary: Server
    standby: Server
    promoted: bool = False

    @property
    def multi_host_url(self) -> str:
        """libpq multi-host URL naming both servers, read-write sessions only."""
        p, s = self.primary, self.standby
        return (f"postgresql://{p.user}:{p.password}@{p.host}:{p.port},{s.host}:{s.port}/{p.database}"
                f"?target_session_attrs=read-write")

    def fail_over(self) -> float:
        """SIGKILL the primary and promote the standby; seconds until the standby takes writes."""
        t0 = time.monotonic()
        if self.primary.pid is not None:
            _signal(self.primary.pid, signal.SIGKILL)
            _wait_exit(self.primary.pid, self.primary._proc, 30)
            self.primary.pid, self.primary._proc = None, None
        self.standby.admin_execute("SELECT pg_promote(true, 30)", database="postgres")
        self.promoted = True
        return time.monotonic() - t0

    def stop(self) -> None:
        """Stop both servers and remove their directories."""
        self.standby.stop()
        self.primary.stop()


def _pg_launcher(data: Path, sock: Path, run_as: str | None) -> Any:
    bindir = _pg_bindir()

    def launch(s: Server) -> None:
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(s.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock}",
                "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=100",
                "-c", "dynamic_shared_memory_type=mmap", "-c", "logging_collector=off"]
        _launch_and_wait(s, argv, run_as, _postgres_ready)
    return launch


def start_pg_replicated(synchronous: bool = True, workdir: Path | None = None) -> PgPair:
    """A primary (`start_postgres`) and a standby cloned from it with pg_basebackup.

    With `synchronous`, ``synchronous_standby_names = '*'`` is set on the primary only
    once the standby streams: set before, every commit would wait for a standby that
    is not there yet.
    """
    primary = start_postgres(workdir)
    run_as = _service_user("postgres")
    directory = _make_dir(workdir, "bap-pg-", run_as)
    data, sock = directory / "data", directory / "sock"
    standby = dataclasses.replace(primary, port=_free_port(), pid=None, directory=directory,
                                  _launch=None, _proc=None)
    try:
        sock.mkdir()
        _chown(sock, run_as)
        env = {**os.environ, "PGPASSWORD": primary.admin_password}
        bindir = _pg_bindir()
        log = directory / "basebackup.log"
        with open(log, "ab") as out:
            extra = _as_user(run_as)
            extra["env"] = {**extra.get("env", env), "PGPASSWORD": primary.admin_password}
            proc = subprocess.run(
                [str(bindir / "pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U", "postgres",
                 "-D", str(data), "-R", "-X", "stream", "--no-sync", "-c", "fast"],
                check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                **extra)
        if proc.returncode != 0:
            raise ServerError(f"pg_basebackup failed:\n{_tail(log)}")
        del env
        launch = _pg_launcher(data, sock, run_as)
        launch(standby)
        standby._launch = launch
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not primary.admin_execute("SELECT 1 FROM pg_stat_replication WHERE state = 'streaming'",
                                         database="postgres"):
            if time.monotonic() > deadline:
                raise ServerError(f"standby did not attach:\n{_tail(directory / 'server.log')}")
            time.sleep(0.05)
        if synchronous:
            primary.admin_execute("ALTER SYSTEM SET synchronous_standby_names = '*'", database="postgres")
            primary.admin_execute("SELECT pg_reload_conf()", database="postgres")
    except BaseException:
        standby.stop()
        primary.stop()
        raise
    return PgPair(primary, standby)


# ---------------------------------------------------------------------------
# pgbouncer


def start_pgbouncer(backend: Server, pool_mode: str = "transaction", pool_size: int = 20,
                    workdir: Path | None = None) -> Proxy:
    """pgbouncer in `pool_mode` in front of `backend`, any database name, SCRAM auth.

    ``server_login_retry = 1``: after a backend restart pgbouncer tries the server again
    after a second instead of refusing logins for the default 15.
    """
    run_as = _service_user("postgres")
    directory = _make_dir(workdir, "bap-pgb-", run_as)
    port = _free_port()
    users = directory / "userlist.txt"
    accounts = {(backend.user, backend.password), (backend.admin_user, backend.admin_password)}
    users.write_text("".join(f'"{u}" "{p}"\n' for u, p in accounts))
    cfg = directory / "pgbouncer.ini"
    cfg.write_text("\n".join([
        "[databases]", f"* = host={backend.host} port={backend.port}",
        "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {port}", f"unix_socket_dir = {directory}",
        "auth_type = scram-sha-256", f"auth_file = {users}", f"pool_mode = {pool_mode}",
        "max_client_conn = 1000", f"default_pool_size = {pool_size}", "server_login_retry = 1",
        "ignore_startup_parameters = extra_float_digits,options", f"pidfile = {directory / 'pgbouncer.pid'}",
        f"admin_users = {backend.admin_user}", "",
    ]))
    for path in (users, cfg):
        _chown(path, run_as)
        path.chmod(0o600)
    front = dataclasses.replace(backend, port=port, pid=None, directory=None, _launch=None, _proc=None)
    proxy = _spawn_proxy("pgbouncer", ["/usr/sbin/pgbouncer", str(cfg)], directory, port, run_as, front)
    proxy.owns_directory = True
    return proxy
