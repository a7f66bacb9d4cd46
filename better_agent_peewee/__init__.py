"""Better Agent's storage contract (memory, runs, replayable streams) on Peewee.

    from better_agent_peewee import peewee_storage, create_tables
    create_tables(db)
    storage = peewee_storage(db)
"""
from .errors import (
    ConflictError,
    DialectError,
    NotFoundError,
    QueryError,
    RecordError,
    SchemaError,
    StorageError,
    UnsupportedTableError,
)
from .schema import check_schema, create_tables, drop_tables
from .storage import Storage, peewee_storage

__all__ = [
    "peewee_storage",
    "create_tables",
    "drop_tables",
    "check_schema",
    "Storage",
    "StorageError",
    "UnsupportedTableError",
    "QueryError",
    "RecordError",
    "NotFoundError",
    "ConflictError",
    "DialectError",
    "SchemaError",
]
__version__ = "0.1.0"
