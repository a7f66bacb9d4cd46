"""create_tables / drop_tables / check_schema for the five tables ("Physical schema" in docs/contract.md)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set, Tuple

import peewee
from playhouse.schema_diff import diff_models

from .dialects import detect_dialect, unwrap
from .models import Models, build_models, expected_indexes, foreign_keys, key_column, primary_key_columns

logger = logging.getLogger(__name__)

__all__ = ["create_tables", "drop_tables", "check_schema"]


def _models(database: Any, dialect: Optional[str]) -> Tuple[peewee.Database, Models]:
    real = unwrap(database)
    return real, build_models(real, detect_dialect(real, dialect))


def create_tables(database: Any, dialect: Optional[str] = None, *,
                  run_primary_key: Optional[bool] = None) -> None:
    """Create the five tables and their indexes where missing. Safe to call again.

    :param run_primary_key: make agent_runs.run_id the table's primary key rather than a
        UNIQUE column (the same column and uniqueness, so every adapter reads and writes it
        unchanged). Default: only where the server requires a primary key on every table
        (Galera's ``wsrep_mode=REQUIRED_PRIMARY_KEY``, MariaDB's ``innodb_force_primary_key``,
        MySQL's ``sql_require_primary_key``).
    """
    real = unwrap(database)
    found = detect_dialect(real, dialect)
    if run_primary_key is None:
        run_primary_key = found.requires_primary_key()
    models = build_models(real, found, run_primary_key=bool(run_primary_key))
    with real.atomic():
        for model in models.in_dependency_order():
            if not model.table_exists():
                logger.debug("create table %s", model._meta.table_name)
                model.create_table(safe=True)


def drop_tables(database: Any, dialect: Optional[str] = None) -> None:
    """Drop the five tables (and their rows) where present."""
    real, models = _models(database, dialect)
    with real.atomic():
        for model in reversed(models.in_dependency_order()):
            if model.table_exists():
                logger.debug("drop table %s", model._meta.table_name)
                model.drop_table(safe=True)


def check_schema(database: Any, dialect: Optional[str] = None) -> List[str]:
    """What is missing or different in the database, in words; an empty list when it matches.

    Checks tables, columns, nullability, primary keys, the messages -> threads foreign key
    and the named indexes. Extra nullable columns are fine (a user's migration may add them);
    an extra NOT NULL column without a default is reported, since inserts would fail.
    """
    real, models = _models(database, dialect)
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
    return problems


def _primary_keys(model: Any) -> List[List[str]]:
    """The primary keys `model`'s table may have: its own, and for a table without one (agent_runs)
    also its key column, which `create_tables` makes the primary key on servers that require one."""
    own = primary_key_columns(model)
    return [own] if own else [own, [key_column(model)]]


def _index_problems(database: peewee.Database, models: Models, missing_tables: Set[str]) -> List[str]:
    found: Dict[str, List[Any]] = {}
    problems = []
    expected = [index for model in models.in_dependency_order() for index in expected_indexes(model)]
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
