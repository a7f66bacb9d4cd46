"""Sample records of the five tables and small helpers shared by the storage tests.

Not a test module: test_storage, test_errors and test_schema import from here so that
one table's sample is written once.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import peewee
import pytest

from better_agent_peewee import create_tables
from tests.conftest import DIALECTS, close_database, reset_database

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z


class Sample(NamedTuple):
    """One table's sample: a key, the minimal and the full record, optional field -> column."""

    table: str  # logical table
    physical: str
    key: str
    minimal: Dict[str, Any]
    full: Dict[str, Any]
    optional: Dict[str, str]


def thread(id: str = "t1", **extra: Any) -> Dict[str, Any]:
    """A minimal thread record; `extra` adds or overrides fields."""
    rec = {"id": id, "agentName": "agent", "createdAt": T0, "updatedAt": T0 + 500}
    rec.update(extra)
    return rec


def message(mid: str = "m1", thread_id: str = "t1", created_at: int = T0, **extra: Any) -> Dict[str, Any]:
    """A minimal AG-UI message record of thread `thread_id`."""
    rec = {"id": mid, "role": "user", "content": "hello", "threadId": thread_id, "createdAt": created_at}
    rec.update(extra)
    return rec


def message_key(rec: Dict[str, Any]) -> str:
    """Better Agent's storage id of a message record."""
    return f"{rec['threadId']}:{rec['createdAt']}:{rec['id']}"


def run(run_id: str = "r1", **extra: Any) -> Dict[str, Any]:
    """A minimal run record (config null, as Better Agent writes it when there is none)."""
    rec = {"runId": run_id, "agentName": "agent", "status": "running", "config": None,
           "startedAt": T0, "updatedAt": T0 + 1}
    rec.update(extra)
    return rec


def stream(run_id: str = "r1", **extra: Any) -> Dict[str, Any]:
    """A minimal open stream record."""
    rec = {"runId": run_id, "status": "open", "createdAt": T0, "updatedAt": T0 + 1}
    rec.update(extra)
    return rec


def event(run_id: str = "r1", seq: int = 1, **extra: Any) -> Dict[str, Any]:
    """A stream event record with id runId:seq."""
    rec = {"id": f"{run_id}:{seq}", "runId": run_id, "seq": seq,
           "timestamp": T0 + (seq if type(seq) is int else 0),
           "event": {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "hi"}}
    rec.update(extra)
    return rec


SAMPLES: Dict[str, Sample] = {
    "memoryThreads": Sample(
        "memoryThreads", "threads", "t1", thread(),
        thread(scope="user-7", title="A title", state={"step": 2, "notes": ["a", "b"]},
               metadata={"source": "test", "tags": ["x"]}),
        {"scope": "scope", "title": "title", "state": "state", "metadata": "metadata"}),
    "memoryMessages": Sample(
        "memoryMessages", "messages", message_key(message()), message(),
        message(runId="r1", role="assistant", content="",
                toolCalls=[{"id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": "{\"a\":1}"}}]),
        {"runId": "run_id"}),
    "runs": Sample(
        "runs", "agent_runs", "r1", run(),
        run(threadId="t1", scope="user-7", status="completed", abortRequestedAt=T0 + 5,
            finalEvent={"type": "RUN_FINISHED", "threadId": "t1", "runId": "r1"},
            config={"model": "m", "temperature": 0.5}, finishedAt=T0 + 9),
        {"threadId": "thread_id", "scope": "scope", "abortRequestedAt": "abort_requested_at",
         "finalEvent": "final_event", "finishedAt": "finished_at"}),
    "streams": Sample(
        "streams", "streams", "r1", stream(), stream(status="closed", closedAt=T0 + 9),
        {"closedAt": "closed_at"}),
    "streamEvents": Sample(
        "streamEvents", "stream_events", "r1:1", event(),
        event(event={"type": "RUN_STARTED", "threadId": "t1", "runId": "r1", "nested": {"a": [1, 2]}}),
        {}),
}

TABLE_NAMES: Tuple[str, ...] = tuple(SAMPLES)
PHYSICAL_TABLES: Tuple[str, ...] = ("threads", "messages", "agent_runs", "streams", "stream_events")


def fresh(rec: Dict[str, Any]) -> Dict[str, Any]:
    """A deep copy, so a test may change a sample freely."""
    return copy.deepcopy(rec)


def expected_read(table: str, rec: Dict[str, Any]) -> Dict[str, Any]:
    """What `get` returns for a stored `rec`: streams carry no `id`; runs always carry `config`."""
    out = fresh(rec)
    if table == "streams":
        out.pop("id", None)
    if table == "runs":
        out.setdefault("config", None)
    return out


def seed_parents(storage: Any, thread_id: str = "t1") -> None:
    """The thread every sample message belongs to."""
    if storage.get("memoryThreads", thread_id) is None:
        storage.set("memoryThreads", thread_id, thread(thread_id))


def sql(database: peewee.Database, text: str, params: Optional[List[Any]] = None) -> List[tuple]:
    """Run `text` (placeholders written `?`) on `database`; the rows it returns."""
    cursor = database.execute_sql(text.replace("?", database.param), params or ())
    return list(cursor.fetchall()) if cursor.description else []


def snapshot(database: peewee.Database) -> Dict[str, List[str]]:
    """Every row of the five tables, as sorted reprs: equal snapshots mean nothing was written."""
    return {t: sorted(repr(tuple(r)) for r in sql(database, f"SELECT * FROM {t}")) for t in PHYSICAL_TABLES}


class StatementCounter:
    """Counts the statements a database runs, through peewee's query hooks."""

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self.statements: List[str] = []

    def _hook(self, event: Any) -> None:
        self.statements.append(event.sql)

    def __enter__(self) -> StatementCounter:
        self.database.query_hooks.append(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.database.query_hooks.remove(self._hook)


def counting(database: peewee.Database, call: Callable[[], Any]) -> Tuple[Any, List[str]]:
    """`call()`'s result and the SQL statements it ran."""
    with StatementCounter(database) as counter:
        result = call()
    return result, counter.statements


def key_of(table: str, rec: Dict[str, Any]) -> str:
    """The id Better Agent stores `rec` under in `table`."""
    if table == "memoryMessages":
        return message_key(rec)
    if table == "runs":
        return rec["runId"]
    if table == "streams":
        return rec["runId"]
    return rec["id"]


# -- one set of tables per test module and dialect -------------------------------------------
#
# Creating the five tables costs ~0.1 s on MariaDB, emptying them ~1 ms. Modules whose tests
# only need empty tables (not an empty database) share them: `dialect_params` makes a
# module-scoped `dialect`, `module_database` creates the tables once, `wipe` empties them.

DIALECT_PARAMS = [pytest.param(d, marks=getattr(pytest.mark, d), id=d) for d in DIALECTS]


def module_database(request: pytest.FixtureRequest, dialect: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[peewee.Database]:
    """A database of `dialect` holding the five (empty) tables, for one module's tests."""
    server = None
    if dialect == "sqlite":
        db: peewee.Database = peewee.SqliteDatabase(
            str(Path(tmp_path_factory.mktemp("shared")) / "shared.db"))
    else:
        server = request.getfixturevalue(f"{dialect}_server")
        reset_database(server)
        params = server.connect_kwargs()
        cls = peewee.PostgresqlDatabase if dialect == "postgres" else peewee.MySQLDatabase
        db = cls(params.pop("database"), **params)
    create_tables(db)
    try:
        yield db
    finally:
        close_database(db)
        if server is not None:
            reset_database(server)


def wipe(database: peewee.Database) -> None:
    """Delete every row of the five tables (children first)."""
    for table in reversed(PHYSICAL_TABLES):
        database.execute_sql(f"DELETE FROM {table}")
