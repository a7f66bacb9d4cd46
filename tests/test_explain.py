"""Every bounded lookup the package makes reads an index, not the whole table, on every dialect.

The tables are filled (bench.growth's data, 10,000 runs and messages) and ANALYZEd, so that
each planner has statistics and a reason to prefer an index; then each lookup runs for real
while its statements are recorded, and each SELECT it sent is EXPLAINed. A full scan of one
of the five tables (SQLite ``SCAN``, PostgreSQL ``Seq Scan``, MySQL/MariaDB type ``ALL`` or
``index``) or a sort of more than a few hundred rows fails the test, naming the statement
and the plan (docs/performance.md lists the plans and the index behind each lookup).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from bench.growth import Growth, recorded
from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.models import PHYSICAL_TABLES
from better_agent_peewee.schema import drop_performance_indexes
from tests.samples import DIALECT_PARAMS, module_database

ROWS = 10_000
#: A sort of more rows than this (the planner's estimate) counts as sorting the table.
SORT_LIMIT = 500
#: A table with fewer rows than this is not big enough to make a scan of it a finding (the
#: test data has 1,000 streams: reading those ten pages beats twenty index probes).
SMALL_TABLE = 5_000
#: Sorts SQLite's EXPLAIN QUERY PLAN cannot size, known to be bounded: (lookup, why).
BOUNDED_SORTS = {
    "messages.list(long thread, limit=20, before_run_id)":
        "SQLite sorts the messages of one run (found by bap_messages_run_idx) rather than walk the index",
}

DAY_MS = 86_400_000


def _oldest_thread(storage: Any) -> int:
    """The updatedAt of bench.growth's oldest thread (its long one)."""
    at: int = storage.memory.threads.get("thread-long")["updatedAt"]
    return at


LOOKUPS: Dict[str, Callable[[Any], Any]] = {
    "runs.latest_for_thread": lambda s: s.runs.latest_for_thread("thread-0000123"),
    "runs.running(agent)": lambda s: s.runs.running("agent-0"),
    "runs.running(agent, scope)": lambda s: s.runs.running("agent-0", scope="team"),
    "list(runs, where threadId, orderBy startedAt desc, take 1)": lambda s: s.list(
        "runs", {"where": {"threadId": "thread-0000042"}, "orderBy": {"startedAt": "desc"}, "take": 1}),
    "runs.get": lambda s: s.runs.get("run-00004321"),
    "messages.list(long thread, limit=20)": lambda s: s.memory.messages.list("thread-long", limit=20),
    "messages.list(long thread, limit=20, before_run_id)": lambda s: s.memory.messages.list(
        "thread-long", limit=20, before_run_id="run-00004000"),
    "messages.list(thread of 5)": lambda s: s.memory.messages.list("thread-0000321"),
    "threads.list(agent, limit=20)": lambda s: s.memory.threads.list(agent_name="agent-3", limit=20),
    "runs.reap_stale (none stale)": lambda s: s.runs.reap_stale(dt.timedelta(hours=1)),
    # (A window of 20 keys: the default of 1,000 is this small table's every stream.)
    "runs.prune (nothing to do)": lambda s: s.runs.prune(dt.timedelta(days=7), orphan_scan=20),
    # Three threads idle since the cutoff (the oldest): the page is a range of bap_threads_updated_idx.
    "memory.prune_threads (dry run)": lambda s: s.memory.prune_threads(
        dt.timedelta(days=1), dry_run=True, now_ms=_oldest_thread(s) + DAY_MS + 200),
    "memory.prune_threads(agent, dry run)": lambda s: s.memory.prune_threads(
        dt.timedelta(days=1), agent_name="agent-0", dry_run=True, now_ms=_oldest_thread(s) + DAY_MS + 200),
}


@pytest.fixture(scope="module", params=DIALECT_PARAMS)
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A storage on tables holding ROWS runs and messages (bench.growth's shape), ANALYZEd."""
    for db in module_database(request, request.param, tmp_path_factory):
        storage = peewee_storage(db)
        growth = Growth(storage, request.param, log=lambda message: None)
        growth.grow(ROWS)
        growth.analyze()
        yield storage


def whole_table_reads(database: Any, dialect: str, sql: str, params: Any,
                      bounded_sort: bool = False) -> Tuple[List[str], str]:
    """What in the plan of `sql` reads or sorts a whole table (empty: none), and the plan."""
    if dialect == "sqlite":
        rows = database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        details = [str(r[3]) for r in rows]
        tables = dict(re.findall(r'FROM "(\w+)" AS "(\w+)"', sql))
        aliases = {alias: table for table, alias in tables.items()}
        bad = [d for d in details if (d.startswith("SCAN ") and aliases.get(d.split()[1], d.split()[1])
                                      in PHYSICAL_TABLES)
               or ("TEMP B-TREE FOR ORDER BY" in d and not bounded_sort)]
        return bad, "\n".join(details)
    if dialect == "postgres":
        (plan,) = database.execute_sql("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()
        plan = plan if isinstance(plan, list) else json.loads(plan)
        bad = []

        def walk(node: Dict[str, Any]) -> None:
            if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in PHYSICAL_TABLES:
                (rows,) = database.execute_sql("SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                                               (node["Relation Name"],)).fetchone()
                if rows >= SMALL_TABLE:
                    bad.append(f"Seq Scan on {node['Relation Name']} ({rows:.0f} rows)")
            if node["Node Type"] == "Sort" and any(c["Plan Rows"] > SORT_LIMIT
                                                   for c in node.get("Plans", [])):
                bad.append(f"Sort of {max(c['Plan Rows'] for c in node['Plans'])} rows")
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        return bad, json.dumps(plan[0]["Plan"], indent=1)
    cursor = database.execute_sql("EXPLAIN " + sql, params)
    names = [d[0].lower() for d in cursor.description]
    rows = [dict(zip(names, r)) for r in cursor.fetchall()]
    bad = []
    for r in rows:
        if r["table"] in PHYSICAL_TABLES and r["type"] in ("ALL", "index"):
            bad.append(f"type {r['type']} on {r['table']}")
        if "filesort" in str(r.get("extra") or "") and int(r["rows"] or 0) > SORT_LIMIT:
            bad.append(f"filesort of {r['rows']} rows of {r['table']}")
    return bad, "\n".join(str(r) for r in rows)


@pytest.mark.parametrize("lookup", list(LOOKUPS))
def test_every_statement_of_a_lookup_reads_an_index(filled: Any, lookup: str) -> None:
    storage = filled
    dialect = storage.dialect.name
    statements = [(sql, params) for sql, params in recorded(storage, lambda: LOOKUPS[lookup](storage))
                  if sql.lstrip().upper().startswith("SELECT") and " FROM " in sql.upper()]
    assert statements, f"{lookup} sent no SELECT"
    for sql, params in statements:
        bad, plan = whole_table_reads(storage.database, dialect, sql, params, lookup in BOUNDED_SORTS)
        assert not bad, f"{lookup} on {dialect}: {bad}\n{sql}\n{plan}"


def test_without_our_indexes_the_lookups_read_whole_tables(filled: Any) -> None:
    """The check above can fail: on the shared schema alone the same lookups scan or sort."""
    storage = filled
    dialect = storage.dialect.name
    db = storage.database
    assert drop_performance_indexes(db)
    try:
        Growth(storage, dialect).analyze()
        failing = []
        for lookup in ("runs.latest_for_thread", "messages.list(long thread, limit=20)",
                       "threads.list(agent, limit=20)", "runs.reap_stale (none stale)"):
            statements = recorded(storage, lambda name=lookup: LOOKUPS[name](storage))  # type: ignore[misc]
            if any(whole_table_reads(db, dialect, sql, params)[0] for sql, params in statements
                   if sql.lstrip().upper().startswith("SELECT") and " FROM " in sql.upper()):
                failing.append(lookup)
        # (Where the shared schema's indexes narrow the rows enough, a planner may sort few.)
        assert {"runs.latest_for_thread", "messages.list(long thread, limit=20)"} <= set(failing), failing
    finally:
        create_tables(db)
        Growth(storage, dialect).analyze()
