"""Security review (docs/security.md), as tests.

* Static: no SQL in the package is built by string formatting. Every string handed to
  `execute_sql` / `execute` / `peewee.SQL` / `raw` is a constant or a precompiled
  statement; the few formatted ones are reviewed and listed here (identifiers or
  constants of the fixed schema only). A new one fails this test until reviewed.
* Dynamic: with every operation of the storage driven by hostile values, no value ever
  appears in the text of a statement sent to the database: values travel as parameters.
* Least privilege (PostgreSQL): a role with only SELECT, INSERT, UPDATE, DELETE on the
  five tables (no CREATE, not the owner) runs the whole storage: the four verbs and the
  memory, runs and streams helpers. Creating the schema is the only thing it cannot do.

The matching README paragraph is docs/security.md.
"""
from __future__ import annotations

import ast
import secrets
from pathlib import Path
from typing import Any, Iterator, List, Set, Tuple

import peewee
import pytest

import better_agent_peewee
from better_agent_peewee import check_schema, create_tables, peewee_storage
from tests.samples import PHYSICAL_TABLES, event, message, message_key, run, stream, thread

PACKAGE = Path(better_agent_peewee.__file__).resolve().parent

#: Formatted SQL that was reviewed: (module, source of the call). Each formats only
#: identifiers or constants of the fixed schema, never a value from a caller.
REVIEWED = {
    ("dialects/base.py", 'peewee.SQL(f"DEFAULT {self.now_default}")'),  # a class constant per dialect
    # The stream poller's PostgreSQL session setup: module constants (channel, statement name) and
    # the poll statement, which formats only the models' table names.
    ("dialects/postgres.py", 'runner.execute(f"LISTEN {CHANNEL}", idempotent=True)'),
    ("dialects/postgres.py", 'runner.execute(f"UNLISTEN {CHANNEL}", idempotent=True)'),
    ("dialects/postgres.py", 'self._runner.execute(f"DEALLOCATE {_PREPARED}", idempotent=True)'),
    ("dialects/postgres.py", 'self._runner.execute(f"EXECUTE {_PREPARED}(%s, %s, %s)", params,\n'
                             '                                             idempotent=True)'),
    ("dialects/postgres.py",
     'self._runner.execute(f"PREPARE {_PREPARED}(text[], bigint[], bigint[]) AS {self._sql}",\n'
     '                                     idempotent=True)'),
    # Index maintenance: index and table names from the models' declaration, never a value.
    ("schema.py", 'database.execute_sql(f"DROP INDEX {_quote(database, index.name)}")'),
    ("schema.py", 'real.execute_sql(d.drop_index_sql(_quote(real, str(index.name)), _quote(real, table)))'),
    # The collation check: one %s placeholder per table name; the names travel as parameters.
    ("dialects/mysql.py",
     'self.database.execute_sql(\n'
     '            "SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME, COLLATION_NAME "\n'
     '            "FROM information_schema.COLUMNS "\n'
     '            f"WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ({marks}) "\n'
     '            "AND DATA_TYPE IN (\'varchar\', \'char\') "\n'
     '            "ORDER BY TABLE_NAME, ORDINAL_POSITION", list(tables))'),
}

SQL_CALLS = {"execute_sql", "execute", "SQL", "raw", "executemany"}


def formatted_sql_calls() -> Set[Tuple[str, str]]:
    """(module, call source) of every SQL call whose SQL argument is built by formatting."""
    found: Set[Tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = (func.attr if isinstance(func, ast.Attribute)
                    else func.id if isinstance(func, ast.Name) else "")
            if name not in SQL_CALLS:
                continue
            sql = node.args[0]
            formatted = (isinstance(sql, ast.JoinedStr)
                         or (isinstance(sql, ast.BinOp) and isinstance(sql.op, (ast.Mod, ast.Add)))
                         or (isinstance(sql, ast.Call) and isinstance(sql.func, ast.Attribute)
                             and sql.func.attr in ("format", "join", "replace", "drop_index_sql")))
            if formatted:
                found.add((path.relative_to(PACKAGE).as_posix(), ast.get_source_segment(source, node) or ""))
    return found


def test_no_sql_built_by_string_formatting() -> None:
    found = formatted_sql_calls()
    unreviewed = found - REVIEWED
    assert not unreviewed, f"SQL built by string formatting; review it and list it in REVIEWED: {unreviewed}"
    assert REVIEWED <= found, f"REVIEWED lists calls that are gone: {REVIEWED - found}"


def test_the_scan_finds_formatted_sql(tmp_path: Path) -> None:
    """The scanner itself works (a test that cannot fail is a defect)."""
    tree = ast.parse('db.execute_sql(f"SELECT * FROM t WHERE id = {x}")\ndb.execute_sql("SELECT 1", (x,))')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert isinstance(calls[0].args[0], ast.JoinedStr) and not isinstance(calls[1].args[0], ast.JoinedStr)
    assert formatted_sql_calls() >= REVIEWED


# -- values never reach the SQL text ---------------------------------------------------------------

MARK = "zq'\"`;--%s?{inj}"


def test_values_travel_as_parameters(database: peewee.Database) -> None:
    """Drive every operation with values containing a marker; the marker is in no statement's text."""
    create_tables(database)
    s = peewee_storage(database)
    seen: List[Tuple[str, Any]] = []
    database.query_hooks.append(lambda ev: seen.append((ev.sql, ev.params)))
    v = MARK
    s.set("memoryThreads", v, thread(v, agentName=v, scope=v, title=v, state={v: v}, metadata={v: v}))
    m = message(v, v, content=v, runId=v)
    s.set("memoryMessages", message_key(m), m)
    s.set("runs", v, run(v, agentName=v, threadId=v, scope=v, config={v: v}))
    s.set("streams", v, stream(v))
    s.set("streamEvents", f"{v}:1", event(v, 1, event={v: v}))
    for table, field in (("memoryThreads", "agentName"), ("memoryThreads", "scope"),
                         ("memoryMessages", "threadId"),
                         ("runs", "threadId"), ("runs", "agentName"), ("streamEvents", "runId")):
        assert s.list(table, {"where": {field: v}, "orderBy": {field: "desc"}, "take": 5})["items"]
    s.memory.threads.list(agent_name=v, scope=v, limit=3)
    s.memory.messages.append(v, [{"role": v, "content": v}], run_id=v)
    s.memory.messages.list(v, limit=2, before_run_id=v)
    s.memory.fork(v + "2", v, transform=lambda ms: ms)
    s.runs.request_abort(v)
    s.runs.abort_requested(v)
    s.runs.finish(v, "aborted", {"type": "RUN_ERROR", "message": v})
    s.runs.latest_for_thread(v)
    s.runs.running(v, scope=v)
    s.streams.open(v)
    s.streams.append(v, {"type": v})
    s.streams.append_many(v, [{"type": v}] * 3)
    s.streams.close(v)
    list(s.streams.resume(v, timeout=0))
    s.memory.threads.delete(v)
    s.get("runs", v)
    s.delete("runs", v)
    assert len(seen) > 30
    leaked = [sql for sql, _ in seen if "zq" in sql]
    assert not leaked, f"a value reached the SQL text: {leaked[:2]}"
    assert any(p == v for _, params in seen for p in params or ())  # ... and travelled as a parameter


# -- least privilege on PostgreSQL -------------------------------------------------------------------


@pytest.fixture
def runtime_role(server: Any, database: peewee.Database) -> Iterator[peewee.Database]:
    """A PostgreSQL login role with SELECT, INSERT, UPDATE, DELETE on the five tables, nothing more;
    the tables made by their owner first. Yields a peewee database connected as that role."""
    create_tables(database)
    database.close()
    role, password = f"bap_runtime_{secrets.token_hex(4)}", secrets.token_hex(12)
    admin = server.connect(admin=True)
    try:
        cur = admin.cursor()
        cur.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD %s NOSUPERUSER NOCREATEDB NOCREATEROLE',
                    (password,))
        cur.execute(f'REVOKE ALL ON SCHEMA public FROM "{role}"')
        cur.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
        cur.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {", ".join(PHYSICAL_TABLES)} TO "{role}"')
        params = server.connect_kwargs()
        params.update(user=role, password=password)
        db = peewee.PostgresqlDatabase(params.pop("database"), **params)
        yield db
        db.close()
    finally:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        cur.execute(f'DROP OWNED BY "{role}"')
        cur.execute(f'DROP ROLE "{role}"')
        admin.close()


@pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres, id="postgres")])
def test_storage_works_with_least_privileges(dialect: str, runtime_role: peewee.Database) -> None:
    db = runtime_role
    role = db.connect_params["user"]
    assert db.execute_sql("SELECT has_schema_privilege(%s, 'public', 'CREATE')",
                          (role,)).fetchone() == (False,)
    s = peewee_storage(db)

    # The four verbs on the five tables.
    s.set("memoryThreads", "t1", thread("t1", state={"a": 1}))
    m = message("m1", "t1")
    s.set("memoryMessages", message_key(m), m)
    s.set("runs", "r0", run("r0", threadId="t1"))
    s.set("streams", "s0", stream("s0"))
    s.set("streamEvents", "s0:1", event("s0", 1))
    for table in ("memoryThreads", "memoryMessages", "runs", "streams", "streamEvents"):
        assert len(s.list(table, {"orderBy": {"createdAt" if table != "runs" and table != "streamEvents"
                                              else ("startedAt" if table == "runs" else "seq"): "desc"},
                                  "take": 10})["items"]) == 1
    s.set("runs", "r0", run("r0", status="completed", finishedAt=1_700_000_000_009))
    s.delete("streamEvents", "s0:1")
    assert s.get("streamEvents", "s0:1") is None

    # Memory.
    s.memory.threads.set("t2", thread("t2", agentName="bot"))
    s.memory.messages.append("t2",
                             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                             run_id="r1")
    assert [x["content"] for x in s.memory.messages.list("t2", limit=1)] == ["yo"]
    s.memory.fork("t3", "t2")
    assert len(s.memory.messages.list("t3")) == 2
    assert [t["id"] for t in s.memory.threads.list(agent_name="bot")] in (["t2", "t3"], ["t3", "t2"])
    s.memory.threads.delete("t2")
    assert s.memory.threads.get("t2") is None

    # Runs.
    s.runs.start("r1", "bot", thread_id="t3", config={"model": "m"})
    assert s.runs.running("bot")["runId"] == "r1"
    assert s.runs.request_abort("r1") == "requested" and s.runs.abort_requested("r1") is True
    s.runs.finish("r1", "aborted", {"type": "RUN_ERROR", "message": "stopped"})
    assert s.runs.latest_for_thread("t3")["status"] == "aborted"

    # Streams.
    s.streams.open("r1")
    assert s.streams.append("r1", {"type": "A"}) == 1
    assert s.streams.append_many("r1", [{"type": "B"}, {"type": "C"}]) == [2, 3]
    s.streams.close("r1")
    assert [e["type"] for e in s.streams.resume("r1")] == ["A", "B", "C"]

    # Reading the schema is allowed (check_schema reads pg_catalog, which every role may read),
    # create_tables finds everything in place and does nothing; changing the schema is refused.
    assert check_schema(db) == []
    create_tables(db)
    with pytest.raises(peewee.ProgrammingError, match="permission denied"):
        db.execute_sql("CREATE TABLE intruder (id text)")
