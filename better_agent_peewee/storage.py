"""The storage object: one table adapter per logical table behind get / set / delete / list."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Type

import peewee

from .dialects import Dialect, detect_dialect, unwrap
from .errors import ConflictError, NotFoundError, UnsupportedTableError
from .models import Models, build_models
from .query import ListCompiler, compile_statement, first_row, marker, select_columns
from .records import TABLES, TableSpec

logger = logging.getLogger(__name__)

__all__ = ["Storage", "TableAdapter", "peewee_storage"]


class TableAdapter:
    """get / set / delete / list for one logical table, each one precompiled statement."""

    def __init__(self, database: peewee.Database, dialect: Dialect, model: Type[peewee.Model],
                 spec: TableSpec) -> None:
        self.spec = spec
        self.model = model
        self._database = database
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

    def _execute(self, sql: str, params: Any) -> Any:
        return self._database.execute_sql(sql, params)

    def get(self, key: Any) -> Optional[Dict[str, Any]]:
        """The record stored under `key`, or None."""
        if not _storable_key(key):
            return None  # no record can have this id (not a string, or a NUL in it)
        row = first_row(self._execute(self._get_sql, (key,)))
        return None if row is None else self.from_row(row)

    def set(self, key: Any, value: Any) -> None:
        """Create or fully replace the record stored under `key` (one upsert statement)."""
        row = self.to_row(key, value)
        logger.debug("set %s %r", self.spec.name, key)
        try:
            self._execute(self._upsert_sql, row)
        except peewee.IntegrityError as exc:
            raise self._integrity_error(exc, key, value) from exc

    def delete(self, key: Any) -> None:
        """Remove the record stored under `key`; an absent key is not an error."""
        if not _storable_key(key):
            return
        logger.debug("delete %s %r", self.spec.name, key)
        try:
            self._execute(self._delete_sql, (key,))
        except peewee.IntegrityError as exc:
            raise self._integrity_error(exc, key, None) from exc

    def list(self, query: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
        """``{"items": [...]}`` matching `query` (where / orderBy / take), all done in SQL."""
        sql, params = self._list.compile(query)
        from_row = self.from_row
        return {"items": [from_row(row) for row in self._execute(sql, params).fetchall()]}

    def iter_rows(self, sql: str, params: Any) -> Iterator[Dict[str, Any]]:
        """Records of the rows a custom SELECT of this table's columns returns."""
        from_row = self.from_row
        for row in self._execute(sql, params).fetchall():
            yield from_row(row)

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


def _storable_key(key: Any) -> bool:
    return isinstance(key, str) and "\x00" not in key


class Storage:
    """Better Agent's storage over a Peewee database: the four verbs over five tables.

    Build it with `peewee_storage`. One object serves every thread of a process: Peewee
    keeps one connection per thread, and the object itself holds only compiled SQL.
    """

    def __init__(self, database: Any, dialect: Optional[str] = None) -> None:
        self.database = unwrap(database)
        self.dialect: Dialect = detect_dialect(database, dialect)
        self.dialect.prepare()
        self.models: Models = build_models(self.database, self.dialect)
        by_table = {
            "memoryThreads": self.models.thread,
            "memoryMessages": self.models.message,
            "runs": self.models.run,
            "streams": self.models.stream,
            "streamEvents": self.models.stream_event,
        }
        self.tables: Dict[str, TableAdapter] = {
            name: TableAdapter(self.database, self.dialect, by_table[name], spec)
            for name, spec in TABLES.items()
        }
        # Imported here: the domain helpers are built on this module.
        from .memory import Memory
        from .runs import Runs
        from .streams import Streams

        self.memory = Memory(self)
        self.runs = Runs(self)
        self.streams = Streams(self)

    def __repr__(self) -> str:
        return f"<Storage {self.dialect.name} {self.database.database!r}>"

    def table(self, name: Any) -> TableAdapter:
        """The adapter of logical table `name`, or UnsupportedTableError."""
        try:
            return self.tables[name]
        except (KeyError, TypeError):
            raise UnsupportedTableError(name) from None

    def get(self, table: str, id: str) -> Optional[Dict[str, Any]]:
        """The record of `table` stored under `id`, or None when absent."""
        return self.table(table).get(id)

    def set(self, table: str, id: str, value: Mapping[str, Any]) -> None:
        """Create or fully replace the record of `table` stored under `id`."""
        self.table(table).set(id, value)

    def delete(self, table: str, id: str) -> None:
        """Remove the record of `table` stored under `id`; absent is not an error."""
        self.table(table).delete(id)

    def list(self, table: str, query: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
        """``{"items": [...]}``: records of `table` matching `query` (where, orderBy, take)."""
        return self.table(table).list(query)

    def transaction(self) -> Any:
        """A transaction for several storage calls (on SQLite it takes the write lock up front)."""
        return self.dialect.transaction()


def peewee_storage(db: Any, dialect: Optional[str] = None) -> Storage:
    """The Better Agent storage object over `db`.

    :param db: any Peewee database (plain, `*Ext`, pooled) or an initialised `DatabaseProxy`.
    :param dialect: "postgres", "mysql" or "sqlite"; inferred when omitted, an error when it
        contradicts `db`.
    """
    return Storage(db, dialect)
