"""The storage object: one table adapter per logical table behind get / set / delete / list."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Type

import peewee
from playhouse.pool import MaxConnectionsExceeded, PooledDatabase

from .dialects import Dialect, detect_dialect, unwrap
from .errors import (
    ConflictError,
    ConnectionLostError,
    NotFoundError,
    PoolExhaustedError,
    RecordError,
    UnsupportedTableError,
)
from .models import Models, build_models
from .query import ListCompiler, compile_statement, marker, select_columns
from .records import TABLES, TableSpec, storable_key

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
        self._execute_sql = fast_execute_sql(database)

    def _execute(self, sql: str, params: Any) -> Any:
        # Every verb's statement is a read, an upsert or a delete by key: idempotent, so it
        # may run again on a fresh connection when the old one turns out dead.
        try:
            return self._execute_sql(sql, params)
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            return _after_failure(self._database, self._dialect, exc, sql, params, True)
        except MaxConnectionsExceeded as exc:
            raise pool_exhausted(self._database, exc) from exc

    def get(self, key: Any) -> Optional[Dict[str, Any]]:
        """The record stored under `key`, or None."""
        if not _storable_key(key):
            return None  # no record can have this id (see records.storable_key)
        # first_row inlined (hot path): fetchall reads to the end, so SQLite releases the statement.
        rows = self._execute(self._get_sql, (key,)).fetchall()
        return self.from_row(rows[0]) if rows else None

    def set(self, key: Any, value: Any) -> None:
        """Create or fully replace the record stored under `key` (one upsert statement)."""
        row = self.to_row(key, value)
        logger.debug("set %s %r", self.spec.name, key)
        try:
            self._execute(self._upsert_sql, row)
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
            self._execute(self._delete_sql, (key,))
        except peewee.IntegrityError as exc:
            raise self._integrity_error(exc, key, None) from exc

    def list(self, query: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
        """``{"items": [...]}`` matching `query` (where / orderBy / take), all done in SQL."""
        sql, params = self._list.compile(query)
        from_row = self.from_row
        return {"items": [from_row(row) for row in self._execute(sql, params).fetchall()]}

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


def json_refused(table: str, field: Optional[str], exc: Exception) -> RecordError:
    """The RecordError for a JSON value the server refused (`Dialect.rejected_json_column`)."""
    return RecordError(table, field, f"the database refused this JSON value, most likely because it is nested "
                                     f"too deeply (MariaDB accepts at most 31 levels; MySQL 100); nothing was "
                                     f"written: {exc}")


_storable_key = storable_key  # not a string, a NUL in it, a trailing space: no record has it

_PEEWEE_DEBUG = logging.getLogger("peewee").isEnabledFor


def fast_execute_sql(database: peewee.Database) -> Callable[..., Any]:
    """`database.execute_sql`, minus peewee's per-call layers where skipping them changes nothing.

    Peewee's ``execute_sql`` passes every statement through ``_execute_cursor``,
    ``_log_query``, ``cursor()`` and ``is_closed()`` (about a microsecond: a tenth of a
    SQLite read by primary key). With the connection open, no query hooks and peewee's
    debug log off, all of that amounts to ``conn.cursor().execute(sql, params)`` inside
    peewee's exception wrapper, which is what the returned function does. Otherwise
    (connection closed: autoconnect; query hooks; peewee debug logging) it calls
    ``database.execute_sql``, and for a database class that overrides any of those methods
    (playhouse's ReconnectMixin, PostgresqlExtDatabase, ...) it is ``database.execute_sql``.
    """
    cls, base = type(database), peewee.Database
    if any(getattr(cls, name, None) is not getattr(base, name, None)
           for name in ("execute_sql", "_execute_cursor", "cursor")) or \
            not isinstance(getattr(database, "query_hooks", None), list):
        return database.execute_sql
    slow: Any = database.execute_sql
    translate: Any = peewee.__exception_wrapper__.__exit__  # type: ignore[attr-defined]

    def execute_sql(sql: str, params: Any = None) -> Any:
        state = database._state  # type: ignore[attr-defined]
        if state.closed or database.query_hooks or _PEEWEE_DEBUG(logging.DEBUG):
            return slow(sql, params)
        try:
            cursor = state.conn.cursor()
            cursor.execute(sql, params or ())
        except Exception as exc:
            # What `with __exception_wrapper__:` does, without its two calls on the happy
            # path: raise the driver's error as the peewee exception of the same name.
            translate(type(exc), exc, exc.__traceback__)
            raise
        return cursor

    return execute_sql


# -- lost connections ------------------------------------------------------------------------
#
# Peewee keeps a dead connection in its per-thread state forever: after a server restart
# every later statement on that thread fails with "connection already closed". So when a
# statement fails, and only then (no ping per call), the storage asks the dialect whether
# the connection is gone; if so it drops it (a pooled one is closed, not returned to the
# pool) and, outside a transaction, runs the statement once more on a fresh connection
# when that is safe. Inside a transaction nothing is retried: the work done so far in it
# died with the connection, and only the caller can decide to redo it.

def _drop_connection(database: peewee.Database) -> None:
    """Forget the calling thread's (dead) connection; the next statement opens a new one."""
    try:
        if isinstance(database, PooledDatabase):
            pool: PooledDatabase = database  # typed as playhouse's own class (mypy's narrowed type is local)
            pool.manual_close()  # closes it instead of putting it back in the pool
        else:
            database.close()
    except Exception:  # closing a dead connection may complain; it is gone either way
        logger.debug("closing a dead connection failed", exc_info=True)
    if not database.is_closed():
        # close() refused (a transaction is open on a dead connection): forget it anyway.
        database._state.reset()  # type: ignore[attr-defined]


def _lost(database: peewee.Database, exc: BaseException, what: str) -> ConnectionLostError:
    return ConnectionLostError(f"{what}: the connection to the {database.__class__.__name__} server was lost "
                               f"or could not be made: {exc}".replace("\n", " ").strip(), getattr(exc, "orig", exc))


def _after_failure(database: peewee.Database, dialect: Dialect, exc: BaseException, sql: str, params: Any,
                   idempotent: bool) -> Any:
    """Handle `exc` raised by `sql`: re-raise it, or reconnect and run `sql` once more."""
    if not dialect.is_connection_lost(exc):
        raise exc
    if database.in_transaction():
        raise _lost(database, exc, "the transaction was rolled back") from exc
    not_sent = dialect.was_not_sent(exc)
    _drop_connection(database)
    if not (idempotent or not_sent):
        raise _lost(database, exc, "the statement may or may not have been applied") from exc
    # connect() also when the database has autoconnect=False
    _or_lost(database, dialect, "reconnecting failed", lambda: database.connect(reuse_if_open=True))
    logger.warning("database connection lost (%s); reconnected, running the statement again", _first_line(exc))
    return _or_lost(database, dialect, "the connection was lost again", lambda: database.execute_sql(sql, params))


def _or_lost(database: peewee.Database, dialect: Dialect, what: str, call: Callable[[], Any]) -> Any:
    """`call()`; a lost connection drops the dead connection and raises ConnectionLostError(`what`)."""
    try:
        return call()
    except (peewee.OperationalError, peewee.InterfaceError) as exc:
        if not dialect.is_connection_lost(exc):
            raise
        _drop_connection(database)
        raise _lost(database, exc, what) from exc


def pool_exhausted(database: peewee.Database, exc: BaseException) -> PoolExhaustedError:
    """The PoolExhaustedError for a pool that had no free connection in time, saying what to change."""
    size = getattr(database, "_max_connections", "?")
    wait = getattr(database, "_wait_timeout", None)
    waited = f"waited {wait} s" if wait else "did not wait (timeout=None)"
    return PoolExhaustedError(
        f"all {size} connections of the {type(database).__name__} are in use and the pool {waited} for one "
        f"to be returned: raise max_connections (and the server's own limit), raise the pool's timeout, or "
        f"return connections sooner (db.close() at the end of every request and job): {exc}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Transaction(contextlib.ContextDecorator):
    """`Storage.transaction()`: the dialect's transaction, made safe against lost connections.

    BEGIN on a dead connection reconnects and begins again (nothing of the transaction has
    run yet). A connection lost inside the transaction surfaces as ConnectionLostError, not
    as the "connection already closed" of the failed ROLLBACK, and the dead connection is
    dropped so the next call works.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._inner: Any = None
        self._outermost = False

    def _recreate_cm(self) -> _Transaction:
        return _Transaction(self._storage)  # used as a decorator: a fresh one per call

    def __enter__(self) -> Any:
        storage = self._storage
        database, dialect = storage.database, storage.dialect
        self._outermost = not database.in_transaction()
        inner = dialect.transaction()
        try:
            entered = inner.__enter__()
        except MaxConnectionsExceeded as exc:
            raise pool_exhausted(database, exc) from exc
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            if not (self._outermost and dialect.is_connection_lost(exc)):
                raise
            _drop_connection(database)
            inner = dialect.transaction()
            entered = _or_lost(database, dialect, "reconnecting failed", inner.__enter__)
            logger.warning("database connection lost before BEGIN (%s); reconnected", _first_line(exc))
        self._inner = inner
        return entered

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        storage = self._storage
        try:
            return self._inner.__exit__(exc_type, exc, tb)
        except (peewee.OperationalError, peewee.InterfaceError) as failure:
            if isinstance(failure, ConnectionLostError) or not storage.dialect.is_connection_lost(failure):
                raise
            if self._outermost:
                _drop_connection(storage.database)
            if isinstance(exc, ConnectionLostError):
                # the statement's own report (and its cause) says it best; `from` would replace that cause
                raise exc  # noqa: B904
            what = "the transaction was rolled back" if exc_type is not None else \
                "the connection was lost at COMMIT: the transaction may or may not have been committed"
            raise _lost(storage.database, failure, what) from failure


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

        self._execute_sql = fast_execute_sql(self.database)
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

    # The four verbs look the table up inline rather than through `table()`: one call less
    # on every operation (the hot path, issue 5).
    def get(self, table: str, id: str) -> Optional[Dict[str, Any]]:
        """The record of `table` stored under `id`, or None when absent."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise UnsupportedTableError(table) from None
        return adapter.get(id)

    def set(self, table: str, id: str, value: Mapping[str, Any]) -> None:
        """Create or fully replace the record of `table` stored under `id`."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise UnsupportedTableError(table) from None
        adapter.set(id, value)

    def delete(self, table: str, id: str) -> None:
        """Remove the record of `table` stored under `id`; absent is not an error."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise UnsupportedTableError(table) from None
        adapter.delete(id)

    def list(self, table: str, query: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
        """``{"items": [...]}``: records of `table` matching `query` (where, orderBy, take)."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise UnsupportedTableError(table) from None
        return adapter.list(query)

    def transaction(self) -> Any:
        """A transaction for several storage calls (on SQLite it takes the write lock up front).

        Nested calls make savepoints. If the connection is lost inside it, the block raises
        ConnectionLostError and nothing of it is applied (unless the loss hit COMMIT itself:
        then it may have been); the next call on this storage reconnects.
        """
        return _Transaction(self)

    def connection(self) -> Any:
        """The calling thread's driver connection, opened (or taken from the pool) if needed.

        :raises ConnectionLostError: the server cannot be reached.
        """
        try:
            return _or_lost(self.database, self.dialect, "connecting failed", self.database.connection)
        except MaxConnectionsExceeded as exc:
            raise pool_exhausted(self.database, exc) from exc

    def execute(self, sql: str, params: Any = (), *, idempotent: bool = True) -> Any:
        """Run one SQL statement on the calling thread's connection; the driver's cursor.

        The domain helpers run their precompiled statements through this. When the
        connection turns out dead (server restarted, network cut) and no transaction is
        open, it reconnects and, if the statement is `idempotent` (a read, an upsert, a
        delete by key) or certainly never reached the server, runs it once more. Pass
        ``idempotent=False`` for a statement whose second run could apply it twice (an
        INSERT that numbers a row, a conditional UPDATE whose row count is the answer):
        it then raises ConnectionLostError when its outcome is unknown.

        :raises ConnectionLostError: the connection is gone and the statement could not be
            (re)run; inside a transaction, always when the connection is lost.
        """
        database = self.database
        if not idempotent and not database.is_closed() and not database.in_transaction() and \
                self.dialect.hung_up(database._state.conn):  # type: ignore[attr-defined]
            # The server hung up on the idle connection (restart, failover, idle timeout): find
            # out with a harmless probe, which reconnects, before sending what must not run twice.
            self.execute("SELECT 1")
        try:
            return self._execute_sql(sql, params)
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            return _after_failure(database, self.dialect, exc, sql, params, idempotent)
        except MaxConnectionsExceeded as exc:
            raise pool_exhausted(database, exc) from exc


def peewee_storage(db: Any, dialect: Optional[str] = None) -> Storage:
    """The Better Agent storage object over `db`.

    :param db: any Peewee database (plain, `*Ext`, pooled) or an initialised `DatabaseProxy`.
    :param dialect: "postgres", "mysql" or "sqlite"; inferred when omitted, an error when it
        contradicts `db`.
    """
    return Storage(db, dialect)
