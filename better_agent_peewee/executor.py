"""Running SQL on the calling thread's connection: the one way this package talks to the database.

`Executor` owns what every statement goes through: the fast path past peewee's per-call
layers, recovery from a lost connection (reconnect, and run again when that is safe),
transactions that survive a dead connection at BEGIN, a pool with no free connection,
and turning server refusals into this package's errors. The table adapters, the domain
helpers (memory, runs, streams), prune and the command line all run their statements
through one `Executor`; nothing below it knows about the storage object.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
import weakref
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import peewee
from playhouse.pool import MaxConnectionsExceeded, PooledDatabase

from .checks import is_int
from .dialects import Dialect
from .errors import (
    ConnectionLostError,
    ContentionError,
    PoolExhaustedError,
    ReadOnlyError,
    RecordError,
    first_line,
)

logger = logging.getLogger(__name__)

__all__ = ["Executor", "Applied", "fast_execute_sql", "json_refused", "pool_exhausted",
           "RECONNECT_WINDOW", "CONFLICT_RETRIES", "read_back_after"]

_T = TypeVar("_T")

#: Seconds a statement outside a transaction keeps trying to reconnect while the server is
#: unreachable (a restart, a failover, a cluster node rejoining) before ConnectionLostError.
RECONNECT_WINDOW = 10.0
#: Times a statement outside a transaction is run again after the server rolled it back as a
#: conflict (deadlock, serialization failure, Galera certification failure, node not ready),
#: with random backoff growing to 0.2 s; then ContentionError. (A `transaction(retries=...)`
#: block gets the reruns its caller asks for.)
CONFLICT_RETRIES = 40
#: ... and for at most this many seconds since the first conflict (a lock wait timeout takes
#: the server's innodb_lock_wait_timeout, 50 s by default, to report: that one is not rerun).
CONFLICT_SECONDS = 30.0


class Applied:
    """What `Executor.execute` returns in place of a cursor when a read-back found that the
    statement whose reply was lost had been applied: its `rowcount`, and no rows."""

    description = None

    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount

    def fetchall(self) -> List[Any]:
        """No rows (the statement's own result was lost with the connection)."""
        return []

    def fetchone(self) -> None:
        """No row."""
        return None


def _conflict_pause(attempt: int) -> None:
    # Random, so the writers that collided do not collide again in lockstep; growing, so a
    # hot row under many writers drains instead of thrashing.
    time.sleep(random.uniform(0, min(0.2, 0.002 * (2 ** min(attempt, 10)))))


def _reconnect_pause(attempt: int, deadline: float) -> None:
    time.sleep(max(0.0, min(0.05 * (2 ** min(attempt, 4)), deadline - time.monotonic())))


def json_refused(table: str, field: Optional[str], exc: Exception) -> RecordError:
    """The RecordError for a JSON value the server refused (`Dialect.rejected_json_column`)."""
    return RecordError(table, field,
                       f"the database refused this JSON value, most likely because it is nested "
                       f"too deeply (MariaDB accepts at most 31 levels; MySQL 100); nothing was "
                       f"written: {exc}")


def read_back_after(lost: ConnectionLostError, read_back: Callable[[], _T]) -> _T:
    """`read_back()`, run after `lost` (a COMMIT whose reply was lost) to learn what was stored.

    If the server cannot be reached for that read either, `lost` itself is raised: the caller
    must hear that the write may have been applied, not merely that the server was away.
    """
    try:
        return read_back()
    except ConnectionLostError:
        raise lost  # noqa: B904 (its own cause, the lost COMMIT, says it best)


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
                               f"or could not be made: {exc}".replace("\n", " ").strip(),
                               getattr(exc, "orig", exc))


def _or_lost(database: peewee.Database, dialect: Dialect, what: str, call: Callable[[], Any]) -> Any:
    """`call()`; a lost connection drops the dead connection and raises ConnectionLostError(`what`)."""
    try:
        return call()
    except (peewee.OperationalError, peewee.InterfaceError) as exc:
        if not dialect.is_connection_lost(exc):
            raise
        _drop_connection(database)
        raise _lost(database, exc, what) from exc


def _read_only(database: peewee.Database, exc: BaseException) -> ReadOnlyError:
    return ReadOnlyError(f"the {database.__class__.__name__} server takes no writes (a read-only standby or "
                         f"replica; connect writers to the primary): {first_line(exc)}",
                         getattr(exc, "orig", exc))


def pool_exhausted(database: peewee.Database, exc: BaseException) -> PoolExhaustedError:
    """The PoolExhaustedError for a pool that had no free connection in time, saying what to change."""
    size = getattr(database, "_max_connections", "?")
    wait = getattr(database, "_wait_timeout", None)
    waited = f"waited {wait} s" if wait else "did not wait (timeout=None)"
    return PoolExhaustedError(
        f"all {size} connections of the {type(database).__name__} are in use and the pool {waited} for one "
        f"to be returned: raise max_connections (and the server's own limit), raise the pool's timeout, or "
        f"return connections sooner (db.close() at the end of every request and job): {exc}")


class _Transaction(contextlib.ContextDecorator):
    """`Executor.transaction()`: the dialect's transaction, made safe against lost connections.

    BEGIN on a dead connection reconnects and begins again (nothing of the transaction has
    run yet). A connection lost inside the transaction surfaces as ConnectionLostError, not
    as the "connection already closed" of the failed ROLLBACK, and the dead connection is
    dropped so the next call works.
    """

    def __init__(self, executor: Executor, retries: int = 0) -> None:
        if not is_int(retries) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r:.80}")
        self._executor = executor
        self._retries = retries
        self._inner: Any = None
        self._outermost = False
        self._decorating = False

    def _recreate_cm(self) -> _Transaction:
        fresh = _Transaction(self._executor)  # used as a decorator: a fresh one per call
        fresh._decorating = True
        return fresh

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:  # type: ignore[override]
        """Decorate `func`: each call runs it in a transaction, rerun up to `retries` times when
        the server rolls it back as a conflict or the connection is lost before COMMIT."""
        retries, executor = self._retries, self._executor

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            attempt = 0
            while True:
                outermost = not executor.database.in_transaction()
                try:
                    with self._recreate_cm():
                        return func(*args, **kwargs)
                except (peewee.OperationalError, peewee.InterfaceError) as exc:
                    # Only the outermost block can run again: a savepoint's failure is its caller's.
                    if attempt >= retries or not outermost or not executor.rerunnable(exc):
                        raise
                    attempt += 1
                    logger.info("transaction rolled back (%s); running it again (%d of %d)",
                                first_line(exc), attempt, retries)
                    if isinstance(exc, ConnectionLostError):
                        # The server went away (restart, failover): wait for it within the reconnect
                        # window, as a statement does, instead of spending every rerun in milliseconds.
                        executor.connection()
                    else:
                        _conflict_pause(attempt)
        return run

    def __enter__(self) -> Any:
        if self._retries and not self._decorating:
            raise TypeError("transaction(retries=N) reruns a function: use it as a decorator "
                            "(@storage.transaction(retries=3)), not in a with statement")
        database, dialect = self._executor.database, self._executor.dialect
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
            logger.warning("database connection lost before BEGIN (%s); reconnected", first_line(exc))
        self._inner = inner
        return entered

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        executor = self._executor
        try:
            return self._inner.__exit__(exc_type, exc, tb)
        except (peewee.OperationalError, peewee.InterfaceError) as failure:
            if isinstance(failure, ConnectionLostError) or not executor.dialect.is_connection_lost(failure):
                raise
            if self._outermost:
                _drop_connection(executor.database)
            own_error = exc is not None and not isinstance(exc, peewee.PeeweeException)
            if own_error or isinstance(exc, ConnectionLostError):
                # The block's own error (or the statement's report of the loss) says why it failed,
                # and the transaction is gone either way; `from` would replace that error's cause.
                raise exc  # noqa: B904
            at_commit = exc_type is None
            what = "the transaction was rolled back" if not at_commit else \
                "the connection was lost at COMMIT: the transaction may or may not have been committed"
            lost = _lost(executor.database, failure, what)
            lost.maybe_applied = at_commit
            raise lost from failure


class Executor:
    """Runs SQL for one database on the calling thread's connection.

    One object serves every thread of a process: Peewee keeps one connection per thread,
    and the executor itself holds only the database, its dialect and the fast path.
    """

    def __init__(self, database: peewee.Database, dialect: Dialect, *,
                 reconnect_window: float = RECONNECT_WINDOW) -> None:
        if not is_int(reconnect_window, or_float=True) or not reconnect_window >= 0:
            raise ValueError(f"reconnect_window must be a non-negative number of seconds, got "
                             f"{reconnect_window!r:.80}")
        self.database = database
        self.dialect = dialect
        self.reconnect_window = float(reconnect_window)
        self._plain_execute_sql = fast_execute_sql(database)
        #: Connections whose per-connection setup is done (`Dialect.set_up_connection`).
        self._set_up: weakref.WeakSet[Any] = weakref.WeakSet()
        self._execute_sql: Callable[..., Any] = self._plain_execute_sql
        if dialect.sets_up_connections:
            self._execute_sql = self._set_up_and_execute_sql

    def __repr__(self) -> str:
        return f"<Executor {self.dialect.name} {self.database.database!r}>"

    def execute(self, sql: str, params: Any = (), *, idempotent: bool,
                resolve: Optional[Callable[[], Any]] = None) -> Any:
        """Run one SQL statement on the calling thread's connection; the driver's cursor.

        Every caller says whether the statement may run twice (`idempotent`, no default): the
        one default is the public `Storage.execute`'s, False, the safe one for a statement the
        package does not know. Outside a transaction:

        * when the connection turns out dead (server restarted, failover, network cut) it
          reconnects, trying again with backoff for up to `reconnect_window` seconds, and
          runs the statement again if it is `idempotent` (a read, an upsert, a delete by
          key) or certainly never reached the server;
        * a statement whose second run could apply it twice (``idempotent=False``: an
          INSERT that numbers a row, a conditional UPDATE whose row count is the answer)
          and whose reply was lost is settled by `resolve`, called once reconnected: it
          reads back what the statement would have written and returns None (not applied:
          the statement runs again) or the result to return (an `Applied`). Without
          `resolve` such a statement raises ConnectionLostError ("may or may not");
        * a statement the server rolled back as a conflict (deadlock, serialization
          failure, Galera certification failure, node not ready) did nothing: it runs
          again with backoff, up to `CONFLICT_RETRIES` times, then ContentionError.

        Inside a transaction nothing is retried: a lost connection raises
        ConnectionLostError, a conflict the driver's error.

        :raises ConnectionLostError: the connection is gone and the statement could not be
            (re)run within the reconnect window; inside a transaction, always.
        :raises ContentionError: conflicts past the retry bound (retry later).
        :raises ReadOnlyError: the server takes no writes (a standby, a read-only replica).
        :raises PoolExhaustedError: a pooled database had no free connection in time.
        """
        database = self.database
        if not idempotent and not database.is_closed() and not database.in_transaction() and \
                self.dialect.hung_up(database._state.conn):  # type: ignore[attr-defined]
            # The server hung up on the idle connection (restart, failover, idle timeout): find
            # out with a harmless probe, which reconnects, before sending what must not run twice.
            # (Also where a lost reply could be settled by reading back: a read-back compares
            # content, and an identical write by someone else meanwhile would pass for ours.)
            self.execute("SELECT 1", idempotent=True)
        try:
            return self._execute_sql(sql, params)
        except (peewee.OperationalError, peewee.InterfaceError, peewee.InternalError) as exc:
            return self._recover(exc, sql, params, idempotent, resolve)
        except MaxConnectionsExceeded as exc:
            raise pool_exhausted(database, exc) from exc

    def _recover(self, exc: BaseException, sql: str, params: Any, idempotent: bool,
                 resolve: Optional[Callable[[], Any]]) -> Any:
        """`sql` raised `exc`: re-raise it (as our error), or reconnect / wait and run it again."""
        database, dialect = self.database, self.dialect
        conflicts = reconnects = 0
        deadline: Optional[float] = None
        started = time.monotonic()
        unsure = False  # the statement may have been applied: its reply was lost
        while True:
            if dialect.is_read_only(exc):
                raise _read_only(database, exc) from exc
            if isinstance(exc, ConnectionLostError) or dialect.is_connection_lost(exc):
                if database.in_transaction():
                    raise _lost(database, exc, "the transaction was rolled back") from exc
                if not (idempotent or dialect.was_not_sent(exc) or isinstance(exc, ConnectionLostError)):
                    unsure = True
                _drop_connection(database)
                if unsure and resolve is None:
                    lost = _lost(database, exc, "the statement may or may not have been applied")
                    lost.maybe_applied = True
                    raise lost from exc
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_window
                elif now >= deadline:
                    raise self._window_over(exc, unsure) from exc
                if reconnects:
                    _reconnect_pause(reconnects, deadline)
                reconnects += 1
                if reconnects == 1:
                    logger.warning("database connection lost (%s); reconnecting", first_line(exc))
            elif dialect.is_transient(exc) and not database.in_transaction():
                conflicts += 1
                if conflicts > CONFLICT_RETRIES or time.monotonic() - started > CONFLICT_SECONDS:
                    raise ContentionError(
                        f"the server rolled the statement back as a conflict {conflicts} times in a row "
                        f"(last: {first_line(exc)}); nothing of it was applied: retry the operation later",
                        getattr(exc, "orig", exc)) from exc
                if dialect.needs_new_connection(exc):
                    _drop_connection(database)  # a node that is not ready: let the proxy pick another
                _conflict_pause(conflicts)
            else:
                raise exc
            try:
                database.connect(reuse_if_open=True)  # also when the database has autoconnect=False
                if unsure:
                    assert resolve is not None
                    outcome = resolve()
                    if outcome is not None:
                        return outcome
                    unsure = False  # read back: not applied, so running it again is safe
                return self._execute_sql(sql, params)
            except MaxConnectionsExceeded as again:
                raise pool_exhausted(database, again) from again
            except (peewee.OperationalError, peewee.InterfaceError, peewee.InternalError) as again:
                exc = again

    def _set_up_and_execute_sql(self, sql: str, params: Any = None) -> Any:
        """`_plain_execute_sql`, after the dialect's per-connection setup of a connection this
        executor has not used yet (opening it first, as the statement would have)."""
        database = self.database
        state = database._state  # type: ignore[attr-defined]
        if state.closed and database.autoconnect:
            database.connect()
        conn = state.conn
        if not state.closed and conn not in self._set_up:
            if not self.dialect.set_up_connection(conn):
                # (Not a Galera node, or causal reads off: no connection needs anything.)
                self._execute_sql = self._plain_execute_sql
            else:
                try:
                    self._set_up.add(conn)
                except TypeError:  # a driver connection without weak references: each time
                    pass
        return self._plain_execute_sql(sql, params)

    def _window_over(self, exc: BaseException, unsure: bool) -> ConnectionLostError:
        """The error once the server stayed away for the whole reconnect window (`unsure`: a
        statement whose reply was lost may have been applied)."""
        # Still unsure: the read-back never ran, so the caller must not take this as "not applied".
        what = f"the server stayed unreachable for the reconnect window ({self.reconnect_window:g} s)"
        if unsure:
            what += "; the statement whose reply was lost may or may not have been applied"
        lost = _lost(self.database, exc, what)
        lost.maybe_applied = unsure
        return lost

    def rerunnable(self, exc: BaseException) -> bool:
        """True when a transaction that raised `exc` did nothing and may simply run again: a
        conflict, or a connection lost before COMMIT."""
        if isinstance(exc, ConnectionLostError):
            return not getattr(exc, "maybe_applied", False)
        if isinstance(exc, ContentionError):
            return True
        return self.dialect.is_transient(exc)

    def execute_query(self, query: peewee.Node, *, idempotent: bool) -> Any:
        """Compile a peewee query and run it with `execute` (`idempotent` as there); the driver's cursor.

        For statements built per call (prune's pages, stats). Values come back as the
        driver returns them: no field converters run.
        """
        sql, params = self.database.get_sql_context().sql(query).query()
        return self.execute(sql, params, idempotent=idempotent)

    def rows(self, query: peewee.Node) -> List[Tuple[Any, ...]]:
        """Every row of the SELECT `query`, as driver tuples."""
        return list(self.execute_query(query, idempotent=True).fetchall())

    def transaction(self, retries: int = 0) -> Any:
        """A transaction for several statements (on SQLite it takes the write lock up front).

        Nested calls make savepoints. If the connection is lost inside it, the block raises
        ConnectionLostError and nothing of it is applied (unless the loss hit COMMIT itself:
        then it may have been); the next statement reconnects. With `retries`, use it as a
        decorator: the decorated function runs again (up to `retries` times) when the
        transaction was rolled back by a conflict or lost before COMMIT (then once the server
        answers again, waiting for it up to the reconnect window).
        """
        return _Transaction(self, retries)

    def connection(self) -> Any:
        """The calling thread's driver connection, opened (or taken from the pool) if needed.

        :raises ConnectionLostError: the server cannot be reached.
        """
        database = self.database
        deadline = time.monotonic() + self.reconnect_window
        attempt = 0
        while True:
            try:
                return _or_lost(database, self.dialect, "connecting failed", database.connection)
            except MaxConnectionsExceeded as exc:
                raise pool_exhausted(database, exc) from exc
            except ConnectionLostError:
                # Unreachable (restart, failover): wait within the reconnect window, as execute does.
                if database.in_transaction() or time.monotonic() >= deadline:
                    raise
                attempt += 1
                _reconnect_pause(attempt, deadline)
