"""The table adapters: get / set / delete / list of one logical table, and the five of a database."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, Type

import peewee

from .domains import ALL_DOMAINS
from .errors import ConflictError, NotFoundError, UnsupportedTableError
from .executor import Executor, json_refused
from .models import Models, logical_name
from .query import ListCompiler, compile_statement, marker, select_columns
from .records import TABLES, TableSpec, storable_key

logger = logging.getLogger(__name__)

__all__ = ["TableAdapter", "Tables", "StorageParts"]


class TableAdapter:
    """get / set / delete / list for one logical table, each one precompiled statement."""

    def __init__(self, executor: Executor, model: Type[peewee.Model], spec: TableSpec) -> None:
        database, dialect = executor.database, executor.dialect
        self.spec = spec
        self.model = model
        self._dialect = dialect
        mapper = spec.make_mapper(dialect)
        self.to_row = mapper.to_row
        self.from_row = mapper.from_row

        fields = {f.column_name: f for f in model._meta.sorted_fields}
        key = fields[spec.key_column]
        columns = select_columns(model, spec, dialect)
        self._get_sql = compile_statement(database, model.select(*columns).where(key == marker("k"))).sql
        self._delete_sql = compile_statement(database, model.delete().where(key == marker("k"))).sql

        # One upsert statement: INSERT ... ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE.
        insert = model.insert({fields[c]: marker(c) for c in spec.columns})
        others = [fields[c] for c in spec.columns if c != spec.key_column]
        statement = compile_statement(database, dialect.upsert(insert, key, others))
        if statement.names != spec.columns:
            raise AssertionError(f"upsert parameters of {spec.table} out of column order: {statement.plan}")
        self._upsert_sql = statement.sql
        self._list = ListCompiler(database, dialect, model, spec)
        # Every verb's statement is a read, an upsert or a delete by key: idempotent, so the
        # executor may run it again on a fresh connection when the old one turns out dead.
        self._execute = executor.execute

    def get(self, key: Any) -> Optional[Dict[str, Any]]:
        """The record stored under `key`, or None."""
        if not _storable_key(key):
            return None  # no record can have this id (see records.storable_key)
        # first_row inlined (hot path): fetchall reads to the end, so SQLite releases the statement.
        rows = self._execute(self._get_sql, (key,), idempotent=True).fetchall()
        return self.from_row(rows[0]) if rows else None

    def set(self, key: Any, value: Any) -> None:
        """Create or fully replace the record stored under `key` (one upsert statement)."""
        row = self.to_row(key, value)
        logger.debug("set %s %r", self.spec.name, key)
        try:
            self._execute(self._upsert_sql, row, idempotent=True)
        except peewee.IntegrityError as exc:
            raise self._integrity_error(exc, key, value) from exc
        except peewee.OperationalError as exc:
            column = self._dialect.rejected_json_column(exc)
            if column is None:
                raise
            field = {"final_event": "finalEvent"}.get(column, column) or None  # JSON column -> record field
            raise json_refused(self.spec.name, field, exc) from exc

    def delete(self, key: Any) -> None:
        """Remove the record stored under `key`; an absent key is not an error."""
        if not _storable_key(key):
            return
        logger.debug("delete %s %r", self.spec.name, key)
        try:
            self._execute(self._delete_sql, (key,), idempotent=True)
        except peewee.IntegrityError as exc:
            raise self._integrity_error(exc, key, None) from exc

    def list(self, query: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
        """``{"items": [...]}`` matching `query` (where / orderBy / take), all done in SQL."""
        sql, params = self._list.compile(query)
        from_row = self.from_row
        return {"items": [from_row(row) for row in self._execute(sql, params, idempotent=True).fetchall()]}

    def _integrity_error(self, exc: peewee.IntegrityError, key: Any, value: Any) -> Exception:
        name = self.spec.name
        if self._dialect.is_foreign_key_violation(exc):
            if value is not None and name == "memoryMessages":
                thread = value.get("threadId")
                return NotFoundError("memoryThreads", thread,
                                     f"memoryMessages: thread {thread!r} does not exist "
                                     f"(message {key!r} refers to it)")
            if name == "memoryThreads":
                return ConflictError(f"memoryThreads: thread {key!r} still has messages; delete them first "
                                     "(storage.memory.threads.delete does both in one transaction)")
        return ConflictError(f"{name}: storing {key!r} conflicts with an existing row: {exc}")


_storable_key = storable_key  # not a string, a NUL in it, a trailing space: no record has it


class Tables:
    """The five table adapters of one database, with the models and the executor they share.

    What the domain helpers (memory, runs, streams) and prune are built on.
    """

    def __init__(self, executor: Executor, models: Models, domains: Tuple[str, ...] = ALL_DOMAINS) -> None:
        self.executor = executor
        self.models = models
        #: The storage domains whose tables are in the database (prune skips the others).
        self.domains = domains
        self.by_name: Dict[str, TableAdapter] = {}
        for model in models.in_dependency_order():
            spec = TABLES[logical_name(model)]
            self.by_name[spec.name] = TableAdapter(executor, model, spec)

    def table(self, name: Any) -> TableAdapter:
        """The adapter of logical table `name`, or UnsupportedTableError."""
        try:
            return self.by_name[name]
        except (KeyError, TypeError):
            raise UnsupportedTableError(name) from None


class StorageParts(Protocol):
    """What prune and stats need of a storage: its executor and its models (`Storage` and
    `Tables` both have them)."""

    executor: Executor
    models: Models
