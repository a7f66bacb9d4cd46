"""create_tables / drop_tables / check_schema for the five tables ("Physical schema" in docs/contract.md)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import peewee
from playhouse.schema_diff import diff_models

from .dialects import Dialect, detect_dialect, unwrap
from .domains import ModelSet
from .models import (
    PERFORMANCE_INDEXES,
    IndexSpec,
    build_models,
    expected_indexes,
    foreign_keys,
    is_performance_index,
    key_column,
    primary_key_columns,
)

logger = logging.getLogger(__name__)

__all__ = ["create_tables", "drop_tables", "check_schema", "SchemaReport", "drop_performance_indexes",
           "missing_indexes"]


class SchemaReport(List[str]):
    """What `check_schema` found: the list itself holds the *problems*, `advice` the rest.

    A problem means the shared schema is not there or differs, so the adapters (ours and the
    TypeScript ones) cannot work on it; advice means everything works, only slower than it
    could (a performance index is missing). Being the list of problems, it compares equal to
    ``[]`` when the adapters can work, as `check_schema` always returned.
    """

    def __init__(self, problems: Sequence[str] = (), advice: Sequence[str] = ()) -> None:
        super().__init__(problems)
        #: What works but could be faster, in words, with what to run.
        self.advice: List[str] = list(advice)

    @property
    def problems(self) -> List[str]:
        """The problems, as a plain list."""
        return list(self)


def _models(database: Any, dialect: Optional[str], domains: Optional[Iterable[str]] = None,
            ) -> Tuple[peewee.Database, ModelSet]:
    real = unwrap(database)
    return real, ModelSet(build_models(real, detect_dialect(real, dialect)), domains)


def create_tables(database: Any, dialect: Optional[str] = None, *,
                  run_primary_key: Optional[bool] = None, concurrently: bool = False,
                  domains: Optional[Iterable[str]] = None) -> List[str]:
    """Create the five tables where missing, and every declared index missing from existing ones.

    Safe to call again. A schema made by the TypeScript adapters' migrations (or by an earlier
    version of this package) gets our performance indexes (and any missing shared index)
    added; an index on the same columns under another name counts as present. Returns the
    names of the indexes added to tables that already existed.

    :param run_primary_key: make agent_runs.run_id the table's primary key rather than a
        UNIQUE column (the same column and uniqueness, so every adapter reads and writes it
        unchanged). Default: only where the server requires a primary key on every table
        (Galera's ``wsrep_mode=REQUIRED_PRIMARY_KEY``, MariaDB's ``innodb_force_primary_key``,
        MySQL's ``sql_require_primary_key``).
    :param concurrently: on PostgreSQL, add indexes with ``CREATE INDEX CONCURRENTLY`` (outside
        a transaction), so a live table keeps taking writes meanwhile; an invalid index left by
        an interrupted concurrent build is dropped and built again. Ignored elsewhere: MariaDB
        and MySQL build secondary indexes online anyway, SQLite has one writer at a time.
    :param domains: only the tables of these storage domains: "memory" (threads, messages),
        "runs" (agent_runs), "streams" (streams, stream_events); default all three.
    """
    real = unwrap(database)
    found = detect_dialect(real, dialect)
    chosen = ModelSet(build_models(real, found), domains)  # a bad domain fails before the database is asked
    if run_primary_key is None:
        run_primary_key = "runs" in chosen.domains and found.requires_primary_key()
    models = ModelSet(build_models(real, found, run_primary_key=bool(run_primary_key)), chosen.domains)
    present: Set[str] = set()
    with real.atomic():
        for model in models.in_dependency_order():
            if model.table_exists():
                present.add(model._meta.table_name)
            else:
                logger.debug("create table %s", model._meta.table_name)
                model.create_table(safe=True)
    added = []
    pg_concurrently = concurrently and found.can_build_index_concurrently
    for index in missing_indexes(real, found, models, present):
        sql = _create_index_sql(real, index, pg_concurrently)
        logger.info("adding index %s to %s: %s", index.name, index.table, sql)
        if pg_concurrently:  # CREATE INDEX CONCURRENTLY cannot run inside a transaction block
            real.execute_sql(sql)
        else:
            with real.atomic():
                real.execute_sql(sql)
        added.append(str(index.name))
    return added


def missing_indexes(database: peewee.Database, dialect: Dialect, models: ModelSet,
                    tables: Set[str]) -> List[IndexSpec]:
    """The declared named indexes missing from `tables` (matched by columns: the name may differ)."""
    missing = []
    for model in models.in_dependency_order():
        table = model._meta.table_name
        if table not in tables:
            continue
        found = database.get_indexes(table)
        invalid = dialect.invalid_indexes(table)
        for index in expected_indexes(model):
            if index.name is None:  # a UNIQUE column constraint: part of the table itself
                continue
            if index.name in invalid:  # an interrupted CREATE INDEX CONCURRENTLY: drop, build again
                logger.warning("dropping invalid index %s (left by an interrupted concurrent build)",
                               index.name)
                database.execute_sql(f"DROP INDEX {_quote(database, index.name)}")
            elif _matching(found, index):
                continue
            missing.append(index)
    return missing


def _matching(found: Sequence[Any], index: IndexSpec) -> List[Any]:
    return [f for f in found if tuple(f.columns) == index.columns and (bool(f.unique) or not index.unique)]


def _quote(database: peewee.Database, name: str) -> str:
    """`name` quoted as an identifier (our names and the shared ones hold no quote character)."""
    return f"{database.quote[0]}{name}{database.quote[-1]}"


def _create_index_sql(database: peewee.Database, index: IndexSpec, concurrently: bool) -> str:
    columns = ", ".join(_quote(database, c) for c in index.columns)
    return (f"CREATE {'UNIQUE ' if index.unique else ''}INDEX {'CONCURRENTLY ' if concurrently else ''}"
            f"{_quote(database, str(index.name))} ON {_quote(database, index.table)} ({columns})")


def drop_performance_indexes(database: Any, dialect: Optional[str] = None) -> List[str]:
    """Drop our own performance indexes (never the shared schema's); returns the names dropped.

    For measuring what they buy, or to hand a database back exactly as the TypeScript
    adapters' migrations make it; `create_tables` adds them again.
    """
    real, models = _models(database, dialect)
    d = detect_dialect(real, dialect)
    tables = set(real.get_tables())
    dropped = []
    for model in models.in_dependency_order():
        table = model._meta.table_name
        if table not in tables:
            continue
        names = {f.name for f in real.get_indexes(table)}
        for index in expected_indexes(model):
            if is_performance_index(index) and index.name in names:
                real.execute_sql(d.drop_index_sql(_quote(real, str(index.name)), _quote(real, table)))
                dropped.append(str(index.name))
    return dropped


def drop_tables(database: Any, dialect: Optional[str] = None, *,
                domains: Optional[Iterable[str]] = None) -> None:
    """Drop the five tables (and their rows) where present; with `domains`, only theirs."""
    real, models = _models(database, dialect, domains)
    with real.atomic():
        for model in reversed(models.in_dependency_order()):
            if model.table_exists():
                logger.debug("drop table %s", model._meta.table_name)
                model.drop_table(safe=True)


def check_schema(database: Any, dialect: Optional[str] = None, *,
                 domains: Optional[Iterable[str]] = None) -> SchemaReport:
    """What is missing or different in the database, in words: the problems, and advice.

    The result is the list of *problems* (empty when the shared schema is there and the
    adapters can work, so existing callers keep working) and carries `SchemaReport.advice`:
    missing performance indexes (``create_tables`` or ``better-agent-peewee init`` adds them).
    Checks tables, columns, nullability, primary keys, the foreign keys, the named indexes,
    and on MySQL/MariaDB the collation of the key columns. Extra nullable columns are fine
    (a user's migration may add them); an extra NOT NULL column without a default is a
    problem, since inserts would fail. With `domains`, only the tables of those domains are
    checked (the others may live elsewhere, or nowhere).
    """
    real, models = _models(database, dialect, domains)
    diff = diff_models(real, models.in_dependency_order())
    problems: List[str] = [f"missing table {m._meta.table_name}" for m in diff.create_tables]
    problems += [f"missing column {f.model._meta.table_name}.{f.column_name}" for f in diff.add_columns]
    missing_tables = {m._meta.table_name for m in diff.create_tables}

    for model in models.in_dependency_order():
        table = model._meta.table_name
        if table in missing_tables:
            continue
        expected = {f.column_name: f for f in model._meta.sorted_fields}
        for column in real.get_columns(table):
            field = expected.get(column.name)
            if field is None:
                if not column.null and column.default is None:
                    problems.append(f"extra column {table}.{column.name} is NOT NULL without a default")
            elif field.null != column.null:
                want = "nullable" if field.null else "NOT NULL"
                problems.append(f"column {table}.{column.name} should be {want}")
        primary = sorted(real.get_primary_keys(table))
        allowed = _primary_keys(model)
        if primary not in allowed:
            want = " or ".join(f"({', '.join(keys) or 'none'})" for keys in allowed)
            problems.append(f"table {table} primary key is ({', '.join(primary) or 'none'}), expected {want}")

    problems += _index_problems(real, models, missing_tables)
    for model in models.in_dependency_order():
        table = model._meta.table_name
        for reference in foreign_keys(model):
            source, target, target_column = reference
            if table in missing_tables or target in missing_tables:
                continue
            found = detect_dialect(real, dialect).foreign_keys(table)  # readable by a non-owner role too
            if reference not in found:
                problems.append(f"missing foreign key {table}.{source} -> {target}.{target_column}")
    problems += detect_dialect(real, dialect).collation_problems(
        [model._meta.table_name for model in models.in_dependency_order()
         if model._meta.table_name not in missing_tables])
    return SchemaReport(problems, _index_advice(real, models, missing_tables))


def _primary_keys(model: Any) -> List[List[str]]:
    """The primary keys `model`'s table may have: its own, and for a table without one (agent_runs)
    also its key column, which `create_tables` makes the primary key on servers that require one."""
    own = primary_key_columns(model)
    return [own] if own else [own, [key_column(model)]]


def _index_problems(database: peewee.Database, models: ModelSet, missing_tables: Set[str]) -> List[str]:
    found: Dict[str, List[Any]] = {}
    problems = []
    expected = [index for model in models.in_dependency_order() for index in expected_indexes(model)
                if not is_performance_index(index)]
    for table, name, columns, unique in expected:
        if table in missing_tables:
            continue
        if table not in found:
            found[table] = database.get_indexes(table)
        matches = [ix for ix in found[table]
                   if tuple(ix.columns) == columns and (bool(ix.unique) or not unique)]
        described = f"{'unique ' if unique else ''}index {name or ''} on {table} ({', '.join(columns)})"
        if not matches:
            problems.append("missing " + " ".join(described.split()))
        elif name is not None and name not in {ix.name for ix in matches}:
            problems.append(f"{' '.join(described.split())} exists under another name "
                            f"({', '.join(ix.name for ix in matches)})")
    return problems


def _index_advice(database: peewee.Database, models: ModelSet, missing_tables: Set[str]) -> List[str]:
    advice = []
    for model in models.in_dependency_order():
        table = model._meta.table_name
        ours = [index for index in expected_indexes(model) if is_performance_index(index)]
        if table in missing_tables or not ours:
            continue
        found = database.get_indexes(table)
        for index in ours:
            if not _matching(found, index):
                advice.append(f"missing performance index {index.name} on {table} "
                              f"({', '.join(index.columns)}), "
                              f"for {PERFORMANCE_INDEXES[str(index.name)]}; "
                              "`better-agent-peewee init` (or create_tables) adds it")
    return advice
