"""Better Agent's storage contract (memory, runs, replayable streams) on Peewee.

    from better_agent_peewee import create_tables, open_database, peewee_storage
    db = open_database("sqlite:///agent.db")
    create_tables(db)
    storage = peewee_storage(db)

The names below are the public surface: the docs import everything they use from here.
"""
import warnings
from typing import Any

from .agent import AgentHandle
from .database_url import DatabaseURLError, open_database
from .errors import (
    ConflictError,
    ConnectionLostError,
    ContentionError,
    DialectError,
    DomainNotConfiguredError,
    NotFoundError,
    PoolExhaustedError,
    QueryError,
    ReadOnlyError,
    RecordError,
    RunAborted,
    RunEndedElsewhere,
    StorageError,
    UnsupportedTableError,
)
from .errors import SchemaError as _SchemaError
from .followers import HEARTBEAT, Follower
from .inspector import inspector_app
from .prune import PruneReport, prune_runs
from .reap import reap_stale
from .retention import ThreadPruneReport, prune_threads
from .runs import AbortRequest
from .schema import SchemaReport, check_schema, create_tables, drop_tables
from .schema import drop_performance_indexes as _drop_performance_indexes
from .server import RunRequest, wsgi_app
from .sse import SSE_HEADERS, event_stream, resume_point
from .storage import Storage, peewee_storage
from .tracking import TrackedRun
from .types import (
    ListResult,
    MessageRecord,
    RunRecord,
    RunStatus,
    StreamEventRecord,
    StreamRecord,
    StreamStatus,
    ThreadRecord,
)

__all__ = [
    "peewee_storage",
    "open_database",
    "create_tables",
    "drop_tables",
    "check_schema",
    "SchemaReport",
    "Storage",
    "StorageError",
    "UnsupportedTableError",
    "DomainNotConfiguredError",
    "QueryError",
    "RecordError",
    "NotFoundError",
    "ConflictError",
    "ConnectionLostError",
    "ContentionError",
    "ReadOnlyError",
    "PoolExhaustedError",
    "DialectError",
    "RunAborted",
    "RunEndedElsewhere",
    "AbortRequest",
    "AgentHandle",
    "DatabaseURLError",
    "prune_runs",
    "reap_stale",
    "PruneReport",
    "ThreadPruneReport",
    "prune_threads",
    "TrackedRun",
    "Follower",
    "HEARTBEAT",
    "event_stream",
    "resume_point",
    "SSE_HEADERS",
    "ThreadRecord",
    "MessageRecord",
    "RunRecord",
    "StreamRecord",
    "StreamEventRecord",
    "RunStatus",
    "StreamStatus",
    "ListResult",
    "wsgi_app",
    "RunRequest",
    "inspector_app",
]
#: The one place the version is written (setup.cfg reads it from here).
__version__ = "0.1.0"

#: Names the root exported in 0.1.0 and no longer does: (the object, what to do instead).
_DEPRECATED = {
    "SchemaError": (_SchemaError, "nothing raises it: check_schema returns a SchemaReport, whose .problems "
                                  "say what differs; it will be removed"),
    "drop_performance_indexes": (_drop_performance_indexes,
                                 "it is for benchmarks and tests: import it from better_agent_peewee.schema"),
}


def __getattr__(name: str) -> Any:
    """The deprecated names, with a DeprecationWarning (PEP 562)."""
    try:
        value, instead = _DEPRECATED[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    warnings.warn(f"better_agent_peewee.{name} is deprecated: {instead}", DeprecationWarning, stacklevel=2)
    return value
