"""Better Agent's storage contract (memory, runs, replayable streams) on Peewee.

    from better_agent_peewee import create_tables, open_database, peewee_storage
    db = open_database("sqlite:///agent.db")
    create_tables(db)
    storage = peewee_storage(db)
"""
from .agent import AgentHandle
from .database_url import DatabaseURLError, open_database
from .errors import (
    ConflictError,
    ConnectionLostError,
    ContentionError,
    DialectError,
    NotFoundError,
    PoolExhaustedError,
    QueryError,
    ReadOnlyError,
    RecordError,
    RunAborted,
    SchemaError,
    StorageError,
    UnsupportedTableError,
)
from .prune import PruneReport, prune_runs, reap_stale
from .runs import AbortRequest
from .schema import SchemaReport, check_schema, create_tables, drop_performance_indexes, drop_tables
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
    "drop_performance_indexes",
    "Storage",
    "StorageError",
    "UnsupportedTableError",
    "QueryError",
    "RecordError",
    "NotFoundError",
    "ConflictError",
    "ConnectionLostError",
    "ContentionError",
    "ReadOnlyError",
    "PoolExhaustedError",
    "DialectError",
    "SchemaError",
    "RunAborted",
    "AbortRequest",
    "AgentHandle",
    "DatabaseURLError",
    "prune_runs",
    "reap_stale",
    "PruneReport",
    "TrackedRun",
    "ThreadRecord",
    "MessageRecord",
    "RunRecord",
    "StreamRecord",
    "StreamEventRecord",
    "RunStatus",
    "StreamStatus",
    "ListResult",
]
__version__ = "0.1.0"
