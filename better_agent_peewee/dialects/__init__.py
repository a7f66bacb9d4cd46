"""Everything that differs between SQLite, PostgreSQL and MySQL/MariaDB, decided once per database.

One module per database, as playhouse's migrators are: `base` (the `Dialect` every database
starts from, and the column types), `sqlite`, `postgres`, `mysql`. Each holds all of its
database's differences: column types and codecs, error classification, per-connection setup
(Galera's causal reads), driver details, and the stream poller's SQL and wake-up source. Nothing
outside this package asks "which database am I?" (tests/test_architecture.py checks it).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

import peewee

from ..errors import DialectError
from ..timestamps import MAX_TIMESTAMP_MS
from .base import Dialect, DialectField, JSONField, TimestampField
from .mysql import MySQLDialect
from .postgres import PostgresDialect
from .sqlite import SqliteDialect

__all__ = ["Dialect", "detect_dialect", "unwrap", "DIALECT_NAMES", "MAX_TIMESTAMP_MS", "DialectField",
           "TimestampField", "JSONField", "SqliteDialect", "PostgresDialect", "MySQLDialect"]

DIALECT_NAMES = ("sqlite", "postgres", "mysql")

_BY_NAME: Dict[str, Type[Dialect]] = {"sqlite": SqliteDialect, "postgres": PostgresDialect,
                                      "mysql": MySQLDialect}
_ALIASES = {"postgresql": "postgres", "pg": "postgres", "mariadb": "mysql", "sqlite3": "sqlite"}


def unwrap(db: Any) -> peewee.Database:
    """The real database behind a `DatabaseProxy`; the database itself otherwise."""
    if isinstance(db, peewee.DatabaseProxy):
        if db.obj is None:
            raise DialectError("the DatabaseProxy is not initialised: call proxy.initialize(db) first")
        return unwrap(db.obj)
    if not isinstance(db, peewee.Database):
        raise DialectError(f"expected a peewee Database, got {type(db).__name__}")
    return db


def _inferred_class(db: peewee.Database) -> Type[Dialect]:
    if isinstance(db, peewee.SqliteDatabase):
        return SqliteDialect
    if isinstance(db, peewee.PostgresqlDatabase):
        return PostgresDialect
    if isinstance(db, peewee.MySQLDatabase):
        return MySQLDialect
    raise DialectError(
        f"unsupported database class {type(db).__name__}: expected a SQLite, PostgreSQL or MySQL database"
    )


def detect_dialect(db: Any, dialect: Optional[str] = None) -> Dialect:
    """The `Dialect` for `db` (any peewee database or an initialised proxy).

    :param db: the peewee database.
    :param dialect: "sqlite", "postgres" or "mysql"; an error when it contradicts `db`.
    """
    real = unwrap(db)
    inferred = _inferred_class(real)
    if dialect is not None:
        name = _ALIASES.get(str(dialect).lower(), str(dialect).lower())
        if name not in _BY_NAME:
            raise DialectError(f"unknown dialect {dialect!r}: expected one of {', '.join(DIALECT_NAMES)}")
        if _BY_NAME[name] is not inferred:
            raise DialectError(
                f"dialect {dialect!r} contradicts the database, a {type(real).__name__} ({inferred.name})"
            )
    return inferred(real)
