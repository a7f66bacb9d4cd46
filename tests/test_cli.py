"""The command line, through real subprocesses (``python -m better_agent_peewee`` and the
``better-agent-peewee`` console script), on SQLite, PostgreSQL and MariaDB."""
from __future__ import annotations

import json
import os
import pty
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from playhouse.migrate import SchemaMigrator

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.cli import parse_duration
from better_agent_peewee.schema import drop_performance_indexes
from better_agent_peewee.stats import stats
from tests.test_prune import DAY, HOUR, add_runs, snapshot
from tests.test_stale import dead_run

PROG = "better-agent-peewee"
TIMEOUT = 60


def cli(*args: str, url: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None, script: bool = False) -> subprocess.CompletedProcess:
    """Run the command line in a subprocess; `url` goes in DATABASE_URL."""
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if url is not None:
        environ["DATABASE_URL"] = url
    environ.update(env or {})
    argv = [console_script()] if script else [sys.executable, "-m", "better_agent_peewee"]
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=environ, cwd=cwd,
                          timeout=TIMEOUT)


def console_script() -> str:
    path = Path(sys.executable).parent / PROG
    found = str(path) if path.exists() else shutil.which(PROG)
    assert found, f"the {PROG} console script is not installed: run `pip install -e .`"
    return found


def one_error_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Assert the command failed with `code` and exactly one stderr line holding `fragments`."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def storage(database: Any) -> Any:
    create_tables(database)
    return peewee_storage(database)


# -- without a database -------------------------------------------------------------------------

def test_help_version_and_console_script() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("init", "check", "prune", "stats", "tail", "export"):
        assert command in result.stdout
    result = cli("--version", script=True)
    assert result.returncode == 0 and result.stdout.startswith(PROG)
    result = cli("prune", "--help")
    assert result.returncode == 0 and "--older-than" in result.stdout and "--reap-stale" in result.stdout


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    one_error_line(cli("frobnicate"), 2, "invalid choice: 'frobnicate'")
    one_error_line(cli(), 2, "required")
    one_error_line(cli("prune", "--older-than", "7x", url=url), 2, "invalid duration '7x'")
    one_error_line(cli("prune", "--older-than", "7", url=url), 2, "invalid duration '7'")
    one_error_line(cli("prune", url=url), 2, "--older-than")
    one_error_line(cli("prune", "--older-than", "1d", "--reap-stale", "soon", url=url), 2, "'soon'")
    one_error_line(cli("prune", "--older-than", "1d", "--batch-size", "0", url=url), 2, "positive integer")
    one_error_line(cli("prune", "--older-than", "1d", "--statuses", "running", url=url), 2, "invalid choice")
    one_error_line(cli("tail", "r1", "--from-seq", "-1", url=url), 2, "non-negative")
    one_error_line(cli("stats"), 2, "DATABASE_URL")
    one_error_line(cli("stats", url="oracle://u:pw@h/db"), 2, "unsupported database URL", "'oracle'")
    one_error_line(cli("stats", "--database", "not a url"), 2, "unsupported database URL")
    one_error_line(cli("stats", "--database", "sqlite://agent.db"), 2, "three slashes")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_unreachable_server_is_one_line_without_the_password(scheme: str) -> None:
    url = f"{scheme}://someone:s3cret@127.0.0.1:{closed_port()}/db"
    for command in (["init"], ["check"], ["stats"], ["prune", "--older-than", "7d"], ["tail", "r"],
                    ["export", "t"]):
        result = cli(*command, url=url)
        line = one_error_line(result, 1, "cannot connect to", f"{scheme}://someone:***@127.0.0.1")
        assert "s3cret" not in line


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    for command in (["check"], ["stats"], ["prune", "--older-than", "7d"], ["tail", "r"], ["export", "t"]):
        one_error_line(cli(*command, url=f"sqlite:///{path}"), 1, "no SQLite database", "init")
    assert not path.exists()
    one_error_line(cli("init", url=f"sqlite:///{tmp_path / 'no-dir' / 'x.db'}"), 1, "cannot connect")


def test_console_script_runs_a_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agent.db'}"
    result = cli("init", url=url, script=True)
    assert result.returncode == 0, result.stderr
    assert cli("check", url=url, script=True).stdout == "schema ok\n"
    # The SQLite file is in WAL mode (set by open_database).
    mode = subprocess.run([sys.executable, "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1])"
                           ".execute('PRAGMA journal_mode').fetchone()[0])", str(tmp_path / "agent.db")],
                          capture_output=True, text=True)
    assert mode.stdout.strip() == "wal"


def test_parse_duration() -> None:
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("0s") == timedelta(0)
    for bad in ("", "7", "d", "7x", "-1d", "1d2", "1.5.2h", "7 days"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


# -- schema commands ----------------------------------------------------------------------------

def test_missing_tables_init_and_check(database: Any, database_url: str) -> None:
    database.connect()  # the database exists (on SQLite: the file), its tables do not
    database.close()
    result = cli("check", url=database_url)
    one_error_line(result, 1, "schema does not match (5 differences")
    assert result.stdout.splitlines() == [f"missing table {t}" for t in
                                          ("threads", "messages", "agent_runs", "streams", "stream_events")]
    one_error_line(cli("stats", url=database_url), 1,
                   "missing tables threads, messages, agent_runs, streams, stream_events", "init")
    one_error_line(cli("prune", "--older-than", "7d", url=database_url), 1, "missing table agent_runs")
    one_error_line(cli("tail", "r1", url=database_url), 1, "missing tables streams, stream_events")
    one_error_line(cli("export", "t1", url=database_url), 1, "missing tables threads, messages")

    result = cli("init", "--database", database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "created threads, messages, agent_runs, streams, stream_events\n"
    assert cli("init", "--database", database_url).stdout == "all tables already present\n"
    result = cli("check", url=database_url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "schema ok\n", "")

    SchemaMigrator.from_database(database).drop_index("stream_events", "stream_events_run_id_idx").run()
    database.close()
    result = cli("check", url=database_url)
    one_error_line(result, 1, "schema does not match (1 difference")
    assert result.stdout == "missing index stream_events_run_id_idx on stream_events (run_id)\n"
    # init adds the missing index back, and nothing else.
    result = cli("init", url=database_url)
    assert result.stdout == "all tables already present\nadded index stream_events_run_id_idx\n"
    result = cli("check", url=database_url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "schema ok\n", "")


def test_check_prints_advice_and_exits_0_on_advice_alone(database: Any, database_url: str) -> None:
    create_tables(database)
    dropped = drop_performance_indexes(database)
    database.close()
    result = cli("check", url=database_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"schema ok ({len(dropped)} advice, above)"
    assert sorted(line.split()[4] for line in lines[:-1]) == sorted(dropped)
    assert all(line.startswith("advice: missing performance index bap_") for line in lines[:-1])
    # A problem and advice: both printed, exit 1.
    SchemaMigrator.from_database(database).drop_index("threads", "threads_agent_name_scope_idx").run()
    database.close()
    result = cli("check", url=database_url)
    one_error_line(result, 1, "schema does not match (1 difference")
    assert result.stdout.splitlines()[0] == ("missing index threads_agent_name_scope_idx "
                                             "on threads (agent_name, scope)")
    assert len(result.stdout.splitlines()) == 1 + len(dropped)
    result = cli("init", "--concurrently", url=database_url)  # CONCURRENTLY on PostgreSQL, ignored elsewhere
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("all tables already present\nadded indexes ")
    assert sorted(result.stdout.split("added indexes ")[1].strip().split(", ")) == sorted(
        dropped + ["threads_agent_name_scope_idx"])
    result = cli("check", url=database_url)
    assert (result.returncode, result.stdout) == (0, "schema ok\n")


# -- prune and stats ----------------------------------------------------------------------------

def build(storage: Any) -> int:
    """Runs relative to the real clock; returns now (ms)."""
    now = int(time.time() * 1000)
    add_runs(storage, [
        {"run_id": "old-1", "status": "completed", "finished_at": now - 10 * DAY},
        {"run_id": "old-2", "status": "failed", "finished_at": now - 9 * DAY},
        {"run_id": "old-int", "status": "interrupted", "finished_at": now - 9 * DAY},
        {"run_id": "new-1", "status": "completed", "finished_at": now - DAY},
        {"run_id": "dead", "status": "running", "started_at": now - 5 * HOUR, "updated_at": now - 3 * HOUR},
        {"run_id": "alive", "status": "running", "started_at": now - HOUR, "updated_at": now - 60_000},
    ], events_per_run=2)
    storage.memory.threads.set("t1", {"id": "t1", "agentName": "agent", "createdAt": now - 20 * DAY,
                                      "updatedAt": now - 20 * DAY})
    storage.memory.messages.append("t1", [{"id": "m1", "role": "user", "content": "hi"}], run_id="old-1")
    return now


def test_prune_dry_run_then_for_real(storage: Any, database_url: str) -> None:
    build(storage)
    before = snapshot(storage)
    storage.database.close()
    dry = cli("prune", "--older-than", "7d", "--dry-run", url=database_url)
    assert dry.returncode == 0 and dry.stderr == ""  # no progress: stderr is not a terminal
    assert dry.stdout.startswith("would prune 2 runs, 2 streams, 4 events older than ")
    assert dry.stdout.endswith("[dry run]\n") and dry.stdout.count("\n") == 1
    assert snapshot(storage) == before

    real = cli("prune", "--older-than", "7d", url=database_url)
    assert real.returncode == 0 and real.stderr == ""
    assert real.stdout.startswith("pruned 2 runs, 2 streams, 4 events older than ")
    after = snapshot(storage)
    assert set(after["runs"]) == {"old-int", "new-1", "dead", "alive"}
    assert set(after["streams"]) == set(after["runs"])
    assert after["memoryThreads"] == before["memoryThreads"]
    assert after["memoryMessages"] == before["memoryMessages"]

    again = cli("prune", "--older-than", "7d", "--include-interrupted", "--batch-size", "1", url=database_url)
    assert again.stdout.startswith("pruned 1 runs, 1 streams, 2 events")
    assert "old-int" not in snapshot(storage)["runs"]


def test_prune_statuses_and_reap_stale(storage: Any, database_url: str) -> None:
    build(storage)
    storage.database.close()
    result = cli("prune", "--older-than", "7d", "--statuses", "failed", url=database_url)
    assert result.stdout.startswith("pruned 1 runs, 1 streams, 2 events")
    one_error_line(cli("prune", "--older-than", "7d", "--statuses", "interrupted", url=database_url), 2,
                   "--include-interrupted")

    result = cli("prune", "--older-than", "7d", "--reap-stale", "2h", url=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reaped 1 stale run; pruned 1 runs, 1 streams, 2 events")
    dead = storage.runs.get("dead")
    assert dead["status"] == "failed" and dead["finalEvent"]["code"] == "STALE_RUN"
    assert storage.streams.get("dead")["status"] == "closed"
    assert storage.runs.get("alive")["status"] == "running"


def test_prune_dry_run_reaps_nothing(storage: Any, database_url: str) -> None:
    build(storage)
    before = snapshot(storage)
    storage.database.close()
    dry = cli("prune", "--older-than", "7d", "--reap-stale", "2h", "--dry-run", url=database_url)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would reap 1 stale run; would prune 2 runs, 2 streams, 4 events")
    assert snapshot(storage) == before
    dry = cli("prune", "--reap-stale", "2h", "--dry-run", url=database_url)
    assert (dry.returncode, dry.stdout) == (0, "would reap 1 stale run [dry run]\n")
    assert snapshot(storage) == before


def test_reap_alone(storage: Any, database_url: str) -> None:
    build(storage)
    before = snapshot(storage)
    storage.database.close()
    one_error_line(cli("prune", url=database_url), 2, "--older-than", "--reap-stale")
    result = cli("prune", "--reap-stale", "2h", url=database_url)
    assert (result.returncode, result.stdout) == (0, "reaped 1 stale run\n"), result.stderr
    after = snapshot(storage)
    assert after["runs"]["dead"]["status"] == "failed" and after["streams"]["dead"]["status"] == "closed"
    # Only the reap: every finished run, however old, is still there.
    assert {k: v for k, v in after["runs"].items() if k != "dead"} == {
        k: v for k, v in before["runs"].items() if k != "dead"}
    result = cli("prune", "--reap-stale", "2h", url=database_url)
    assert result.stdout == "reaped 0 stale runs\n"


def test_prune_progress_on_a_terminal(storage: Any, database_url: str) -> None:
    build(storage)
    storage.database.close()
    master, slave = pty.openpty()
    environ = dict(os.environ, DATABASE_URL=database_url)
    proc = subprocess.Popen([sys.executable, "-m", "better_agent_peewee", "prune", "--older-than", "7d",
                             "--batch-size", "1"], stdout=subprocess.PIPE, stderr=slave, env=environ,
                             text=True)
    os.close(slave)
    out, _ = proc.communicate(timeout=TIMEOUT)
    progress = read_all(master)
    assert proc.returncode == 0
    assert out.startswith("pruned 2 runs") and out.count("\n") == 1  # stdout: the summary only
    assert "\rbatch 1: 1 runs, 1 streams, 2 events" in progress
    assert "\rbatch 2: 2 runs, 2 streams, 4 events" in progress


def read_all(fd: int) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 5)
        if not ready:
            break
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode()


def test_stats(storage: Any, database_url: str) -> None:
    now = build(storage)
    storage.database.close()
    result = cli("stats", "--json", url=database_url)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    assert numbers == stats(storage)
    assert numbers["tables"] == {"threads": 1, "messages": 1, "agent_runs": 6, "streams": 6,
                                 "stream_events": 12}
    assert numbers["runs"] == {"completed": 2, "failed": 1, "interrupted": 1, "running": 2}
    assert numbers["oldestRun"] == now - 10 * DAY - HOUR and numbers["newestRun"] == now - HOUR

    text = cli("stats", url=database_url)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[:5] == [f"{t:<13}  {n:>10}" for t, n in numbers["tables"].items()]
    assert lines[5] == "runs by status: completed 2, failed 1, interrupted 1, running 2"
    assert lines[6].startswith("oldest run:") and lines[6].endswith("Z")


# -- tail and export ----------------------------------------------------------------------------

class Lines:
    """The stdout lines of a running subprocess, read by a thread (select() cannot see what
    Python's buffered reader has already pulled in)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")  # end of output

    def next(self) -> str:
        try:
            line = self._queue.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("the subprocess printed nothing") from None
        assert line, "the subprocess ended its output"
        return line

    def rest(self) -> List[str]:
        self._thread.join(TIMEOUT)
        lines = []
        while not self._queue.empty():
            line = self._queue.get()
            if line:
                lines.append(line)
        return lines


def test_tail_follows_a_stream_until_it_closes_or_ctrl_c(storage: Any, database_url: str) -> None:
    storage.streams.open("run-1")
    storage.streams.append("run-1", {"type": "RUN_STARTED", "runId": "run-1"})
    storage.streams.append("run-1", {"type": "TEXT_MESSAGE_CONTENT", "delta": "héllo"})
    environ = dict(os.environ, DATABASE_URL=database_url)
    proc = subprocess.Popen([sys.executable, "-m", "better_agent_peewee", "tail", "run-1", "--poll-interval",
                             "0.02"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ, text=True)
    out = Lines(proc)
    try:
        lines = [json.loads(out.next()) for _ in range(2)]
        assert proc.poll() is None, "the stream is open: tail keeps following"
        storage.streams.append("run-1", {"type": "TEXT_MESSAGE_CONTENT", "delta": "world"})
        lines.append(json.loads(out.next()))
        storage.streams.append("run-1", {"type": "RUN_FINISHED"})
        storage.streams.close("run-1")
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    lines += [json.loads(line) for line in out.rest()]
    assert [e["seq"] for e in lines] == [1, 2, 3, 4]
    assert lines[1] == {"type": "TEXT_MESSAGE_CONTENT", "delta": "héllo", "seq": 2}
    assert lines[3]["type"] == "RUN_FINISHED"

    # A closed stream from --from-seq: the rest, then exit at once.
    result = cli("tail", "run-1", "--from-seq", "2", url=database_url)
    assert result.returncode == 0
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == [3, 4]
    one_error_line(cli("tail", "no-such-run", url=database_url), 1, "no stream for run 'no-such-run'")

    # Ctrl-C: exit code 130, no traceback.
    storage.streams.open("run-2")
    storage.streams.append("run-2", {"type": "RUN_STARTED"})
    environ = dict(os.environ, DATABASE_URL=database_url)
    proc = subprocess.Popen([sys.executable, "-m", "better_agent_peewee", "tail", "run-2", "--poll-interval",
                             "0.02"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ, text=True)
    out = Lines(proc)
    try:
        assert json.loads(out.next())["seq"] == 1
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_export(storage: Any, database_url: str) -> None:
    storage.memory.threads.set("t1", {"id": "t1", "agentName": "agent", "title": "Ünïcode",
                                      "state": ["any", {"json": None}], "createdAt": 1, "updatedAt": 2})
    storage.memory.messages.append("t1", [{"id": "m1", "role": "user", "content": "hi"},
                                          {"id": "m2", "role": "assistant", "content": "hello",
                                           "toolCalls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]}],
                                   run_id="r1")
    storage.memory.threads.set("t2", {"id": "t2", "agentName": "agent", "createdAt": 1, "updatedAt": 2})
    storage.database.close()
    result = cli("export", "t1", url=database_url)
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    assert exported == {"thread": storage.memory.threads.get("t1"),
                        "messages": storage.memory.messages.list("t1")}
    assert [m["id"] for m in exported["messages"]] == ["m1", "m2"]
    assert exported["messages"][1]["toolCalls"][0]["function"]["name"] == "f"

    empty = json.loads(cli("export", "t2", url=database_url).stdout)
    assert empty["messages"] == [] and empty["thread"]["id"] == "t2"
    one_error_line(cli("export", "t3", url=database_url), 1, "thread 't3' not found")


def test_examples_prune_cron(storage: Any, database_url: str) -> None:
    """examples/prune_cron.py: what the crontab line runs."""
    build(storage)
    storage.database.close()
    script = Path(__file__).resolve().parent.parent / "examples" / "prune_cron.py"
    environ = dict(os.environ, DATABASE_URL=database_url, PRUNE_OLDER_THAN="7d", PRUNE_REAP_STALE="2h")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environ,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "reaped 1 stale run" in result.stderr and "pruned 2 runs, 2 streams, 4 events" in result.stderr
    assert set(snapshot(storage)["runs"]) == {"old-int", "new-1", "dead", "alive"}
    assert storage.runs.get("dead")["status"] == "failed"


def test_tail_of_a_dead_workers_run_says_so(storage: Any, database_url: str) -> None:
    dead_run(storage, "dead", "agent", [{"type": "RUN_STARTED"}])
    storage.database.close()
    result = cli("tail", "dead", url=database_url)
    line = one_error_line(result, 1, "'dead'", "presumed dead", "--reap-stale")
    assert line.startswith(f"{PROG} tail: error: ")
    assert [json.loads(x)["type"] for x in result.stdout.splitlines()] == ["RUN_STARTED"]
