"""The exceptions this package raises: one base class, one subclass per kind of fault.

Every message names what is wrong (the table, the field, the value) so a user can
fix the call without reading our source.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import peewee


def first_line(exc: BaseException) -> str:
    """The first non-empty line of `exc`'s message (its class name when it has none), for logs."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class StorageError(Exception):
    """Base class of every error raised by better_agent_peewee."""


class UnsupportedTableError(StorageError, LookupError):
    """A table name outside the five logical tables.

    Better Agent reads this kind as "this storage area is not configured".
    """

    def __init__(self, table: object) -> None:
        self.table = table
        super().__init__(f"Storage table {table!r} is not supported")


class DomainNotConfiguredError(UnsupportedTableError):
    """A call needs a storage domain (memory, runs or streams) that this storage was built
    without (`peewee_storage(db, domains=...)`); nothing was read or written.

    `domain` names it; `table` is the logical table asked for, when one was. Being an
    `UnsupportedTableError`, it is what Better Agent reads as "this storage area is not configured".
    """

    def __init__(self, domain: str, needed_by: str, table: Optional[str] = None) -> None:
        super().__init__(table if table is not None else domain)
        self.domain = domain
        self.args = (f"the {domain} domain is not configured in this storage ({needed_by} needs it); "
                     f"to enable it, create its tables (create_tables(db, domains=[..., {domain!r}]) or "
                     f"`better-agent-peewee init --domains ...,{domain}`) and build the storage with "
                     f"peewee_storage(db, domains=[..., {domain!r}])",)


class QueryError(StorageError, ValueError):
    """A `list` query that names an unknown field, a bad direction or a bad `take`."""

    def __init__(self, table: str, message: str, allowed: Optional[Iterable[str]] = None) -> None:
        self.table = table
        self.allowed = tuple(allowed) if allowed is not None else ()
        text = f"{table}: {message}"
        if allowed is not None:
            text += f" (allowed fields: {', '.join(sorted(self.allowed))})"
        super().__init__(text)


class RecordError(StorageError, ValueError):
    """A record that cannot be stored: missing field, wrong type, unstorable value.

    `table` and `field` say where (`field` None: the record as a whole), `reason` what is
    wrong; the message is ``"table.field: reason"``.
    """

    def __init__(self, table: str, field: Optional[str], reason: str) -> None:
        self.table = table
        self.field = field
        self.reason = reason
        where = f"{table}.{field}" if field else table
        super().__init__(f"{where}: {reason}")


class NotFoundError(StorageError, LookupError):
    """The record an operation needs does not exist (a stream, a run, a thread)."""

    def __init__(self, table: str, key: object, message: Optional[str] = None) -> None:
        self.table = table
        self.key = key
        super().__init__(message or f"{table}: no record with id {key!r}")


class ConflictError(StorageError):
    """The operation would break a constraint (e.g. deleting a thread that still has messages)."""


class DialectError(StorageError, ValueError):
    """The database is not one we support, or contradicts the dialect the caller named."""


class SchemaError(StorageError):
    """The tables in the database do not match the schema this package needs."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("schema does not match: " + "; ".join(self.problems))


class ConnectionLostError(StorageError, peewee.OperationalError):
    """The connection to the database server was lost (server restarted, network cut) or
    could not be made.

    Outside a transaction the storage has already dropped the dead connection and tried
    again once on a fresh one (for reads and idempotent writes), so this means the server
    is still unreachable, or the statement was not idempotent and may or may not have been
    applied. Inside a transaction nothing is retried: the transaction is gone (rolled back
    by the server, or, if the connection died during COMMIT, possibly committed) and the
    caller decides whether to run it again. Either way the next call on the same storage
    object reconnects by itself. It is also a `peewee.OperationalError`, so code that
    catches that keeps working.
    """

    #: True when the lost statement or COMMIT may have been applied (the reply was lost).
    maybe_applied = False

    def __init__(self, message: str, orig: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.orig = orig


class PoolExhaustedError(StorageError):
    """Every connection of a `playhouse.pool` database stayed in use for the pool's whole
    wait `timeout`: the message names the pool's size and wait, and what to change."""


class ContentionError(StorageError, peewee.OperationalError):
    """The server kept rolling the statement back as a conflict (deadlock, serialization
    failure, Galera certification failure, a cluster node not ready) after the storage had
    retried it with backoff up to its bound. Nothing of the failed attempt was applied:
    retry the operation later (or lower the contention on that row). It is also a
    `peewee.OperationalError`, so code that catches that keeps working."""

    def __init__(self, message: str, orig: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.orig = orig


class ReadOnlyError(StorageError, peewee.InternalError):
    """A write reached a server that only takes reads: a PostgreSQL hot standby (or a session
    in a read-only transaction), a MySQL/MariaDB replica with ``read_only``. Nothing was
    written. Point writers at the primary (a multi-host URL with
    ``target_session_attrs=read-write`` follows it through a failover)."""

    def __init__(self, message: str, orig: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.orig = orig


class RunAborted(Exception):
    """Raised by `run.check_abort()` inside `storage.runs.track(...)` once an abort of the run
    was requested; raise it yourself to stop a run as aborted.

    The `track` block that it leaves records the run as `aborted` (a RUN_ERROR with code
    ABORTED) and ends quietly. It is not a StorageError: it says the run was stopped on
    request, not that the storage failed, so `except StorageError` does not catch it.
    """

    code = "ABORTED"


class RunEndedElsewhere(RunAborted):
    """Raised by `run.check_abort()` (and `run.emit(...)`) inside `storage.runs.track(...)` once
    the run was ended by someone else: failed by `reap_stale` (its worker was presumed dead),
    finished or aborted by another writer, or deleted. The worker should stop: the block it
    leaves writes nothing more (the first outcome stays) and ends quietly, like `RunAborted`.

    ``status`` is the run's status as read (None: the run is gone), ``final_event`` its
    final event (the reaper's RUN_ERROR with code STALE_RUN, say).
    """

    code = "RUN_ENDED_ELSEWHERE"

    def __init__(self, message: str, run_id: str, status: Optional[str],
                 final_event: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.final_event = final_event
