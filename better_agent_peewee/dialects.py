"""Everything that differs between SQLite, PostgreSQL and MySQL/MariaDB, decided once per database.

A `Dialect` answers three questions for the rest of the package:

* which column types the five tables use (CONTRACT 3 and 3a),
* how a timestamp (epoch ms) and a JSON value become a driver parameter and back,
* how a multi-statement transaction is opened, and how a driver error is classified.

Nothing outside this module asks "which database am I?".
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from typing import Any, Callable, ContextManager, Optional, Type

import peewee

from .errors import DialectError

logger = logging.getLogger(__name__)

__all__ = ["Dialect", "detect_dialect", "DIALECT_NAMES"]

DIALECT_NAMES = ("sqlite", "postgres", "mysql")

_MS = _dt.timedelta(milliseconds=1)
_EPOCH = _dt.datetime(1970, 1, 1)
_EPOCH_UTC = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)

#: Largest timestamp every dialect can hold: 9999-12-31T23:59:59.999Z.
MAX_TIMESTAMP_MS = 253402300799999

# Compact JSON, as JSON.stringify writes it; NaN/Infinity are refused (PostgreSQL cannot store them).
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
dumps: Callable[[Any], str] = _encoder.encode
_loads = json.loads


def _load_text(value: Any) -> Any:
    """Decode JSON that the driver hands back as text (SQLite, MySQL, MariaDB)."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return _loads(value)
    return value  # a driver (or a user's adapter) that already decoded it


def _load_native(value: Any) -> Any:
    """PostgreSQL's drivers decode json/jsonb themselves: a str here is a JSON string value."""
    return value


# -- timestamps ---------------------------------------------------------------------------

_ISO_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|z|[+-]\d{2}:?\d{2}(?::?\d{2})?)?$"
)


def parse_iso_ms(text: str) -> int:
    """Epoch ms of an ISO-8601 timestamp: `T` or space, optional fraction, `Z`/offset/none (= UTC)."""
    if len(text) == 24 and text[23] == "Z" and text[10] == "T":
        # The exact form we and the TypeScript adapters write: the fast path.
        return (_dt.datetime.fromisoformat(text[:23]) - _EPOCH) // _MS
    match = _ISO_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    date, time, fraction, zone = match.groups()
    fraction = (fraction or "")[:6].ljust(6, "0")
    stamp = _dt.datetime.fromisoformat(f"{date}T{time}.{fraction}")
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = _dt.timedelta(hours=int(digits[0:2]), minutes=int(digits[2:4]),
                               seconds=int(digits[4:6] or 0))
        stamp -= sign * offset
    return (stamp - _EPOCH) // _MS


def _sqlite_encode_ts(ms: int) -> str:
    # Exactly YYYY-MM-DDTHH:MM:SS.mmmZ: the TypeScript side orders these as text.
    return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds") + "Z"


def _sqlite_decode_ts(value: Any) -> int:
    if isinstance(value, str):
        return parse_iso_ms(value)
    if isinstance(value, int):
        return value  # epoch ms written by hand into a TEXT column
    if isinstance(value, _dt.datetime):
        return _naive_to_ms(value)
    raise ValueError(f"cannot read a timestamp from {value!r}")


def _naive_to_ms(value: Any) -> int:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            return (value - _EPOCH_UTC) // _MS
        return (value - _EPOCH) // _MS
    if isinstance(value, str):
        return parse_iso_ms(value)
    raise ValueError(f"cannot read a timestamp from {value!r}")


def _mysql_encode_ts(ms: int) -> _dt.datetime:
    # DATETIME(3) holds naive UTC.
    return _EPOCH + ms * _MS


def _postgres_encode_ts(ms: int) -> _dt.datetime:
    return _EPOCH_UTC + ms * _MS


# -- column types -------------------------------------------------------------------------

class _Column(peewee.Field):
    """A column whose DDL type is given verbatim by the dialect, converting nothing itself."""

    field_type = "TEXT"


class _TimestampColumn(_Column):
    """Epoch-ms integers in Python, the dialect's timestamp type in the database."""

    encode: Callable[[int], Any] = staticmethod(_postgres_encode_ts)
    decode: Callable[[Any], int] = staticmethod(_naive_to_ms)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, peewee.Node):
            return value
        return self.encode(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else self.decode(value)


class _JSONColumn(_Column):
    """Any JSON value in Python, the dialect's JSON type in the database."""

    load: Callable[[Any], Any] = staticmethod(_load_text)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, peewee.Node):
            return value
        return dumps(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else self.load(value)


# -- the dialects -------------------------------------------------------------------------

class Dialect:
    """Column shims, value codecs and transaction style of one database engine."""

    name = "base"
    #: MySQL table options; empty elsewhere.
    table_settings: tuple = ()
    key_type = "TEXT"
    text_type = "TEXT"
    int_type = "INTEGER"
    json_type = "TEXT"
    timestamp_type = "TEXT"
    now_default = ""

    encode_ts: Callable[[int], Any] = staticmethod(_postgres_encode_ts)
    decode_ts: Callable[[Any], int] = staticmethod(_naive_to_ms)
    #: Decodes a JSON column as our statements select it (see `select_json`).
    load_json: Callable[[Any], Any] = staticmethod(_load_text)
    #: Decodes a JSON column as the driver returns it for a plain peewee query.
    field_load_json: Callable[[Any], Any] = staticmethod(_load_text)
    dump_json: Callable[[Any], str] = staticmethod(dumps)

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self._field_classes = self._make_field_classes()

    def __repr__(self) -> str:
        return f"<Dialect {self.name}>"

    # Column factories: the models call these, so the DDL of every table comes from here.
    def _make_field_classes(self) -> dict:
        dialect = self

        class TimestampColumn(_TimestampColumn):
            field_type = dialect.timestamp_type
            encode = staticmethod(dialect.encode_ts)
            decode = staticmethod(dialect.decode_ts)

        class JSONColumn(_JSONColumn):
            field_type = dialect.json_type
            load = staticmethod(dialect.field_load_json)

        class KeyColumn(_Column):
            field_type = dialect.key_type

        class TextColumn(_Column):
            field_type = dialect.text_type

        return {"ts": TimestampColumn, "json": JSONColumn, "key": KeyColumn, "text": TextColumn}

    def key(self, **kwargs: Any) -> peewee.Field:
        """A key or indexed text column (VARCHAR(255) on MySQL, TEXT elsewhere)."""
        return self._field_classes["key"](**kwargs)

    def text(self, **kwargs: Any) -> peewee.Field:
        """An unindexed text column of any length."""
        return self._field_classes["text"](**kwargs)

    def integer(self, **kwargs: Any) -> peewee.Field:
        """A 32-bit integer column."""
        return peewee.IntegerField(**kwargs)

    def json(self, **kwargs: Any) -> peewee.Field:
        """A JSON column (jsonb, JSON, or JSON text on SQLite)."""
        return self._field_classes["json"](**kwargs)

    def timestamp(self, default_now: bool = False, **kwargs: Any) -> peewee.Field:
        """A UTC timestamp column; `default_now` adds the server-side DEFAULT now."""
        if default_now:
            kwargs.setdefault("constraints", []).append(peewee.SQL(f"DEFAULT {self.now_default}"))
        return self._field_classes["ts"](**kwargs)

    def select_json(self, column: peewee.Field) -> peewee.Node:
        """How our statements select a JSON column so that `load_json` can decode it."""
        return column

    def upsert(self, insert: Any, key: peewee.Field, others: list) -> Any:
        """`insert` turned into a single-statement upsert on `key`, replacing `others`."""
        return insert.on_conflict(conflict_target=[key], preserve=others).returning()

    # Transactions and errors.
    def transaction(self) -> ContextManager[Any]:
        """A transaction (or a savepoint when one is open) for several statements."""
        return self.database.atomic()

    def is_unique_violation(self, exc: BaseException) -> bool:
        """True when `exc` is a UNIQUE / PRIMARY KEY violation."""
        return isinstance(exc, peewee.IntegrityError) and not self.is_foreign_key_violation(exc)

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        """True when `exc` is a FOREIGN KEY violation."""
        return False

    def prepare(self) -> None:
        """Per-database settings the storage relies on (SQLite pragmas); nothing elsewhere."""


class SqliteDialect(Dialect):
    """SQLite: JSON and timestamps as text (`...mmmZ`), foreign keys on, WAL, IMMEDIATE writes."""

    name = "sqlite"
    now_default = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
    encode_ts = staticmethod(_sqlite_encode_ts)
    decode_ts = staticmethod(_sqlite_decode_ts)

    def transaction(self) -> ContextManager[Any]:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # can fail with "database is locked" instead of waiting on the busy timeout.
        db = self.database
        if db.in_transaction():
            return db.atomic()
        return db.atomic(lock_type="IMMEDIATE")

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        return "FOREIGN KEY" in str(exc)

    def prepare(self) -> None:
        # `permanent=True` records the pragma so every connection the database opens later
        # (one per thread) gets it too; the current connection gets it now.
        db = self.database
        db.pragma("foreign_keys", 1, permanent=True)
        if db.database and db.database != ":memory:":
            # WAL lets readers (stream followers) run while one writer appends.
            db.pragma("journal_mode", "wal", permanent=True)


class PostgresDialect(Dialect):
    """PostgreSQL: jsonb and timestamptz."""

    name = "postgres"
    json_type = "JSONB"
    timestamp_type = "TIMESTAMPTZ"
    now_default = "now()"
    encode_ts = staticmethod(_postgres_encode_ts)
    decode_ts = staticmethod(_naive_to_ms)
    field_load_json = staticmethod(_load_native)

    def select_json(self, column: peewee.Field) -> peewee.Node:
        # As text, so SQL NULL (absent) and JSON null (None) stay apart: the driver's
        # own jsonb decoding turns both into None.
        return peewee.Cast(column, "text")

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        code = getattr(getattr(exc, "orig", None), "pgcode", None) or getattr(exc, "pgcode", None)
        if code is not None:
            return code == "23503"
        return "foreign key" in str(exc)


class MySQLDialect(Dialect):
    """MySQL and MariaDB: JSON, DATETIME(3) in UTC, VARCHAR(255) keys, utf8mb4_bin (case-sensitive ids)."""

    name = "mysql"
    table_settings = ("DEFAULT CHARSET=utf8mb4", "COLLATE=utf8mb4_bin")
    key_type = "VARCHAR(255)"
    text_type = "LONGTEXT"
    json_type = "JSON"
    timestamp_type = "DATETIME(3)"
    now_default = "CURRENT_TIMESTAMP(3)"
    encode_ts = staticmethod(_mysql_encode_ts)
    decode_ts = staticmethod(_naive_to_ms)

    def __init__(self, database: peewee.Database) -> None:
        super().__init__(database)
        self._mariadb: Optional[bool] = None

    @property
    def is_mariadb(self) -> bool:
        """True on MariaDB (JSON is LONGTEXT with a validity check there). Asks the server once."""
        if self._mariadb is None:
            version = self.database.execute_sql("SELECT VERSION()").fetchone()[0]
            self._mariadb = "mariadb" in str(version).lower()
        return self._mariadb

    def upsert(self, insert: Any, key: peewee.Field, others: list) -> Any:
        # ON DUPLICATE KEY UPDATE names no target: every unique key of the table is one.
        return insert.on_conflict(preserve=others)

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        args = getattr(getattr(exc, "orig", None), "args", None) or getattr(exc, "args", ())
        if args and isinstance(args[0], int):
            return args[0] in (1451, 1452)
        return "foreign key constraint" in str(exc)


_BY_NAME: dict = {"sqlite": SqliteDialect, "postgres": PostgresDialect, "mysql": MySQLDialect}
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
