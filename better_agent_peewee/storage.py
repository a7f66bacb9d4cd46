"""The storage object: Better Agent's four verbs over five tables, and the domain helpers.

`Storage` is the front: it picks the dialect, builds the models, the executor and the
table adapters, and hands them to memory, runs and streams. Nothing below imports it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, cast

from .agent import AgentHandle
from .dialects import Dialect, detect_dialect, unwrap
from .domains import Unconfigured, check_domains, domain_of
from .errors import DomainNotConfiguredError, UnsupportedTableError
from .executor import RECONNECT_WINDOW, Executor
from .memory import Memory
from .models import Models, build_models
from .runs import Runs
from .streams import Streams
from .tables import TableAdapter, Tables

logger = logging.getLogger(__name__)

__all__ = ["Storage", "TableAdapter", "peewee_storage"]


class Storage:
    """Better Agent's storage over a Peewee database: the four verbs over five tables.

    Build it with `peewee_storage`. One object serves every thread of a process: Peewee
    keeps one connection per thread, and the object itself holds only compiled SQL.
    """

    def __init__(self, database: Any, dialect_name: Optional[str] = None, *,
                 reconnect_window: float = RECONNECT_WINDOW, causal_reads: bool = True,
                 domains: Optional[Iterable[str]] = None) -> None:
        """:param database: any Peewee database or an initialised `DatabaseProxy`.
        :param dialect_name: "postgres", "mysql" or "sqlite"; inferred when omitted.
        :param reconnect_window: see `peewee_storage`.
        :param causal_reads: see `peewee_storage`.
        :param domains: see `peewee_storage`."""
        #: The storage domains this storage has: "memory", "runs", "streams" (all three by default).
        self.domains = check_domains(domains)
        self.database = unwrap(database)
        self.dialect: Dialect = detect_dialect(database, dialect_name)
        self.dialect.prepare(causal_reads=causal_reads)
        self.models: Models = build_models(self.database, self.dialect)
        self.executor = Executor(self.database, self.dialect, reconnect_window=reconnect_window)
        parts = Tables(self.executor, self.models, self.domains)
        self.tables: Dict[str, TableAdapter] = {name: adapter for name, adapter in parts.by_name.items()
                                                if domain_of(name) in self.domains}
        memory = Memory(parts) if "memory" in self.domains else None
        streams = Streams(parts) if "streams" in self.domains else None
        # An omitted domain's helper raises DomainNotConfiguredError on any use (domains.Unconfigured).
        self.memory: Memory = memory or cast(Memory, Unconfigured("memory"))
        self.streams: Streams = streams or cast(Streams, Unconfigured("streams"))
        self.runs: Runs = Runs(parts, memory, streams) if "runs" in self.domains else \
            cast(Runs, Unconfigured("runs"))

    def __repr__(self) -> str:
        return f"<Storage {self.dialect.name} {self.database.database!r}>"

    def agent(self, name: str, scope: Optional[str] = None) -> AgentHandle:
        """The runs of agent `name` (in `scope`, when given): `running()`, `abort(run_id=None)` and
        `resume(run_id=None, after_seq=0)`, as Better Agent's ``app.agent(name)``.

        Without a run id they act on the agent's latest running run; a run id of another agent
        or scope raises NotFoundError exactly as a missing run does.
        """
        return AgentHandle(self.runs, self.streams, name, scope)

    def table(self, name: Any) -> TableAdapter:
        """The adapter of logical table `name`, or UnsupportedTableError (DomainNotConfiguredError
        for a table of a domain this storage was built without)."""
        try:
            return self.tables[name]
        except (KeyError, TypeError):
            raise self._unsupported(name, "table") from None

    def _unsupported(self, table: Any, verb: str) -> UnsupportedTableError:
        domain = domain_of(table) if isinstance(table, str) else None
        if domain is None:
            return UnsupportedTableError(table)
        return DomainNotConfiguredError(domain, f"storage.{verb}({table!r}, ...)", table)

    # The four verbs look the table up inline rather than through `table()`: one call less
    # on every operation (the hot path, see docs/performance.md).
    def get(self, table: str, id: str) -> Optional[Dict[str, Any]]:
        """The record of `table` stored under `id`, or None when absent."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise self._unsupported(table, "get") from None
        return adapter.get(id)

    def set(self, table: str, id: str, value: Mapping[str, Any]) -> None:
        """Create or fully replace the record of `table` stored under `id`."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise self._unsupported(table, "set") from None
        adapter.set(id, value)

    def delete(self, table: str, id: str) -> None:
        """Remove the record of `table` stored under `id`; absent is not an error."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise self._unsupported(table, "delete") from None
        adapter.delete(id)

    def list(self, table: str, query: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
        """``{"items": [...]}``: records of `table` matching `query` (where, orderBy, take)."""
        try:
            adapter = self.tables[table]
        except (KeyError, TypeError):
            raise self._unsupported(table, "list") from None
        return adapter.list(query)

    def transaction(self, retries: int = 0) -> Any:
        """A transaction for several storage calls (on SQLite it takes the write lock up front).

        Nested calls make savepoints. If the connection is lost inside it, the block raises
        ConnectionLostError and nothing of it is applied (unless the loss hit COMMIT itself:
        then it may have been); the next call on this storage reconnects.

        ``@storage.transaction(retries=3)`` decorates a function instead: each call runs it
        in a transaction, and runs it again (up to 3 more times) when the server rolled the
        transaction back as a conflict (deadlock, serialization failure, Galera certification
        failure) or the connection was lost before COMMIT. The function must be safe to run
        again: everything it did in the database was rolled back, but not its other effects.
        """
        return self.executor.transaction(retries)

    def connection(self) -> Any:
        """The calling thread's driver connection, opened (or taken from the pool) if needed.

        :raises ConnectionLostError: the server cannot be reached.
        """
        return self.executor.connection()

    def execute(self, sql: str, params: Any = (), *, idempotent: bool = False) -> Any:
        """Run one SQL statement on the calling thread's connection; the driver's cursor.

        See `Executor.execute`: a lost connection is reopened and the statement run again
        when that is safe: it never reached the server, or the caller says running it twice
        does no harm (`idempotent=True`, e.g. a SELECT). The default assumes it might
        (an INSERT must not be applied twice).
        """
        return self.executor.execute(sql, params, idempotent=idempotent)


def peewee_storage(db: Any, dialect: Optional[str] = None, *, reconnect_window: float = RECONNECT_WINDOW,
                   causal_reads: bool = True, domains: Optional[Iterable[str]] = None) -> Storage:
    """The Better Agent storage object over `db`.

    :param db: any Peewee database (plain, `*Ext`, pooled) or an initialised `DatabaseProxy`.
    :param dialect: "postgres", "mysql" or "sqlite"; inferred when omitted, an error when it
        contradicts `db`.
    :param reconnect_window: seconds an operation outside a transaction keeps reconnecting
        (with backoff) while the server is unreachable, as during a restart or a failover,
        before it raises ConnectionLostError; 0 turns the waiting off.
    :param causal_reads: on a Galera cluster, make every connection read what any node has
        committed before it (``wsrep_sync_wait``), so a write on one node is seen by the next
        read on another; False trades that for a little latency per read. Ignored elsewhere.
    :param domains: the storage domains kept in `db`: "memory" (threads, messages), "runs",
        "streams" (streams, stream events); default all three. A call that needs another one
        raises DomainNotConfiguredError and writes nothing; `runs.track` records runs without
        streams (no events are stored) and without memory (no thread, no messages).
    """
    return Storage(db, dialect, reconnect_window=reconnect_window, causal_reads=causal_reads, domains=domains)
