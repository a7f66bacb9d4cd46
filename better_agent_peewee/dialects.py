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
import math
import re
import select
from typing import Any, Callable, ContextManager, Dict, List, Optional, Set, Tuple, Type, cast

import peewee
from playhouse.pool import PooledDatabase

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
_encode: Callable[[Any], str] = _encoder.encode
_loads = json.loads
# The C scanner behind json.loads, called directly on the hot path (row decoding): it skips
# json.loads' per-call Python layers (type checks, BOM test, two whitespace regexes).
_scan_once: Callable[[str, int], Tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def dumps(value: Any) -> str:
    """Compact JSON text of `value`, at any nesting depth."""
    try:
        return _encode(value)
    except RecursionError:
        # The C encoder recurses once per level: deep values (about 1,000 levels, fewer on a
        # deep call stack) take the iterative path, which writes the very same text.
        return _dumps_iterative(value, _encode)


def _load_text(value: Any) -> Any:
    """Decode JSON that the driver hands back as text (SQLite, MySQL, MariaDB; PostgreSQL as text)."""
    if type(value) is str:
        # Fast path for the text we and the TypeScript adapters write: one JSON document with
        # no surrounding whitespace. Anything else (whitespace, errors, deep nesting) takes
        # the general path below, which decides exactly as json.loads does.
        try:
            obj, end = _scan_once(value, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if end == len(value):
                return obj
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return _loads(value)
        except RecursionError:
            # Nested deeper than the decoder's recursion allows (possibly written by another
            # client): decode without recursion rather than make the row unreadable.
            return _loads_iterative(value)
    return value  # a driver (or a user's adapter) that already decoded it


# -- JSON without recursion (slow paths, only taken when the C codecs hit the recursion limit)

def _json_key(key: Any, scalar: Callable[[Any], str]) -> str:
    # The C encoder's rules for object keys (JSON.stringify would have had strings only).
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return scalar(key)
    if isinstance(key, (int, float)):
        return scalar(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _dumps_iterative(value: Any, scalar: Callable[[Any], str]) -> str:
    """The text `dumps` writes, built with an explicit stack; `scalar` encodes the leaves."""
    parts: List[str] = []
    stack: List[Any] = []  # [iterator, closing bracket, is_object, first, id]
    open_ids: Set[int] = set()
    item = value
    while True:
        if isinstance(item, dict) or isinstance(item, (list, tuple)):
            marker = id(item)
            if marker in open_ids:
                raise ValueError("Circular reference detected")
            open_ids.add(marker)
            is_object = isinstance(item, dict)
            parts.append("{" if is_object else "[")
            stack.append([iter(cast(Dict[Any, Any], item).items()) if is_object else iter(item),
                          "}" if is_object else "]",
                          is_object, True, marker])
        else:
            parts.append(scalar(item))
        while stack:
            top = stack[-1]
            try:
                nxt = next(top[0])
            except StopIteration:
                parts.append(top[1])
                open_ids.discard(top[4])
                stack.pop()
                continue
            if not top[3]:
                parts.append(",")
            top[3] = False
            if top[2]:
                key, nxt = nxt
                parts.append(_encode(_json_key(key, scalar)))
                parts.append(":")
            item = nxt
            break
        else:
            return "".join(parts)


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_CONSTANTS = (("true", True), ("false", False), ("null", None))


def _loads_iterative(text: str) -> Any:
    """`json.loads(text)` for standard JSON, with an explicit stack instead of recursion."""
    from json import decoder

    # The str scanner json.decoder uses (C or pure Python): real, but not in the stdlib stubs.
    scanstring: Callable[[str, int], Tuple[str, int]] = decoder.scanstring  # type: ignore[attr-defined]

    def fail(pos: int) -> ValueError:
        return ValueError(f"invalid JSON at character {pos}: {text[pos:pos + 20]!r}")

    def read_key(pos: int) -> Tuple[str, int]:
        if text[pos:pos + 1] != '"':
            raise fail(pos)
        key, pos = scanstring(text, pos + 1)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] != ":":
            raise fail(pos)
        return key, _WS.match(text, pos + 1).end()  # type: ignore[union-attr]

    stack: List[List[Any]] = []  # [container, key (None in an array)]
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    while True:
        char = text[pos:pos + 1]
        if char == "{" or char == "[":
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            if text[pos:pos + 1] == ("}" if char == "{" else "]"):
                value: Any = {} if char == "{" else []
                pos += 1
            elif char == "{":
                key, pos = read_key(pos)
                stack.append([{}, key])
                continue
            else:
                stack.append([[], None])
                continue
        elif char == '"':
            value, pos = scanstring(text, pos + 1)
        else:
            match = _NUMBER.match(text, pos)
            if match is not None:
                whole, fraction, exponent = match.groups()
                value = float(whole + (fraction or "") + (exponent or "")) if fraction or exponent else int(whole)
                pos = match.end()
            else:
                for word, constant in _CONSTANTS:
                    if text.startswith(word, pos):
                        value, pos = constant, pos + len(word)
                        break
                else:
                    raise fail(pos)
        while True:  # hand `value` to its container; close the containers that end here
            if not stack:
                pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
                if pos != len(text):
                    raise fail(pos)
                return value
            top = stack[-1]
            container = top[0]
            if top[1] is None:
                container.append(value)
            else:
                container[top[1]] = value
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            char = text[pos:pos + 1]
            if char == ",":
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                if top[1] is not None:
                    top[1], pos = read_key(pos)
                break
            if char != ("]" if top[1] is None else "}"):
                raise fail(pos)
            pos += 1
            stack.pop()
            value = container


# PostgreSQL's jsonb keeps numbers as `numeric` and prints them without an exponent: the
# float 1e+23 comes back as the integer 100000000000000000000000 (a different value for
# Python). Floats that Python writes with a positive exponent are therefore written as
# their exact integral value plus ".0", which jsonb keeps as it is.
_POSITIVE_EXPONENT = re.compile(r"[0-9]e\+[0-9]")


def _exact_float_scalar(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        text = float.__repr__(value)
        return f"{int(value)}.0" if "e+" in text else text
    return _encode(value)


def _dumps_for_jsonb(value: Any) -> str:
    """`dumps`, except that large floats are written so that jsonb keeps them floats."""
    text = dumps(value)
    if "e+" in text and _POSITIVE_EXPONENT.search(text):  # cheap test first; rare
        return _dumps_iterative(value, _exact_float_scalar)
    return text


def _load_native(value: Any) -> Any:
    """PostgreSQL's drivers decode json/jsonb themselves: a str here is a JSON string value."""
    return value


# -- timestamps ---------------------------------------------------------------------------

_ISO_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|z|[+-]\d{2}:?\d{2}(?::?\d{2})?)?$"
)


_fromisoformat = _dt.datetime.fromisoformat


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
    if type(value) is str and len(value) == 24 and value[23] == "Z" and value[10] == "T":
        # parse_iso_ms's fast path inlined: every timestamp of every row read comes here.
        return (_fromisoformat(value[:23]) - _EPOCH) // _MS
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


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's exception behind a peewee one (peewee passes it as the first argument)."""
    first = exc.args[0] if exc.args else None
    if isinstance(first, BaseException):
        return first
    return exc.__cause__ or exc.__context__ or exc


def _pg_code(exc: BaseException) -> Optional[str]:
    err = _driver_error(exc)
    return getattr(err, "pgcode", None) or getattr(err, "sqlstate", None)


def _mysql_errno(exc: BaseException) -> Optional[int]:
    args = getattr(_driver_error(exc), "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _readable(fd: int) -> bool:
    # An idle client connection has nothing to read unless the server said something on its
    # own: a termination notice / end-of-file (or, rarely, a NOTIFY; a false alarm costs a probe).
    return bool(select.select([fd], [], [], 0)[0])


def _pg_gone_code(code: Optional[str]) -> bool:
    # Class 08 (connection exception); 57P01-57P03: admin shutdown, crash shutdown, cannot connect now.
    return code is not None and (code.startswith("08") or code in ("57P01", "57P02", "57P03"))


_PG_UNREACHABLE = re.compile(
    r"connection refused|could not connect|server closed the connection|terminating connection|"
    r"the database system is (?:starting up|shutting down|not yet accepting|in recovery)|"
    r"could not (?:send|receive) data|timeout expired|no connection to the server|"
    r"could not translate host name|no route to host|network is unreachable|"
    r"SSL (?:connection has been closed|SYSCALL error)|"
    # pgbouncer while its server is down or restarting (server_login_retry)
    r"server login has been failing|pgbouncer cannot connect to server|server conn crashed|"
    r"no more connections allowed", re.IGNORECASE)

#: MySQL/MariaDB client and server errors meaning the connection is gone: server has gone
#: away, lost connection during query / at handshake, server shutdown in progress, connection
#: killed (MariaDB), disconnected for inactivity (MySQL 8).
_MYSQL_GONE = frozenset((2006, 2013, 2055, 1053, 1927, 4031))
#: ... and that the server cannot be reached: can't connect (socket / TCP), plus the above.
_MYSQL_UNREACHABLE = _MYSQL_GONE | {2002, 2003}


# -- the dialects -------------------------------------------------------------------------

class Dialect:
    """Column shims, value codecs and transaction style of one database engine."""

    name = "base"
    #: MySQL table options; empty elsewhere.
    table_settings: Tuple[str, ...] = ()
    key_type = "TEXT"
    text_type = "TEXT"
    json_type = "TEXT"
    timestamp_type = "TEXT"
    now_default = ""
    #: One writer at a time for the whole database (SQLite): callers may queue their own
    #: threads for it rather than leave them to the busy timeout, which grants no turn order.
    single_writer = False

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
    def _make_field_classes(self) -> Dict[str, Type[peewee.Field]]:
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

    def text_equals(self, column: peewee.Node, value: peewee.Node) -> peewee.Node:
        """`column = value` for a text column, exact: code point by code point, spaces included."""
        return cast(peewee.Node, column == value)

    def text_order(self, column: peewee.Node) -> peewee.Node:
        """What to ORDER BY so that a text column sorts by code point (as Python sorts str)."""
        return column

    def upsert(self, insert: Any, key: peewee.Field, others: List[Any]) -> Any:
        """`insert` turned into a single-statement upsert on `key`, replacing `others`."""
        return insert.on_conflict(conflict_target=[key], preserve=others).returning()

    # Transactions and errors.
    def transaction(self) -> ContextManager[Any]:
        """A transaction (or a savepoint when one is open) for several statements."""
        return self.database.atomic()

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        """True when `exc` is a FOREIGN KEY violation."""
        return False

    def is_transient(self, exc: BaseException) -> bool:
        """True when `exc` is a deadlock or serialization failure: the server rolled the
        transaction back and running it again may succeed."""
        return False

    def is_read_only(self, exc: BaseException) -> bool:
        """True when `exc` says the server (a standby, a replica) takes no writes."""
        return False

    def needs_new_connection(self, exc: BaseException) -> bool:
        """True when the conflict `exc` means this connection's server cannot serve now (a
        cluster node that is not synced), so a retry should reconnect (through a proxy: to
        another node)."""
        return False

    def requires_primary_key(self) -> bool:
        """True when the server refuses to create a table without a primary key."""
        return False

    def json_param(self, node: peewee.Node) -> peewee.Node:
        """A JSON parameter where the server cannot infer its type (the SELECT list of an
        INSERT ... SELECT)."""
        return node

    def skip_duplicates(self, insert: Any) -> Any:
        """`insert` made to skip rows that would duplicate a unique key; the cursor's rowcount
        tells how many were stored. Where a dialect cannot skip only those, duplicates raise
        IntegrityError instead (callers handle both)."""
        return insert.on_conflict(action="nothing")

    def rejected_json_column(self, exc: BaseException) -> Optional[str]:
        """The JSON column whose value the server refused (too deep for it), or None."""
        return None

    def foreign_keys(self, table: str) -> List[Tuple[str, str, str]]:
        """(column, referenced table, referenced column) of each foreign key of `table`."""
        return [(fk.column, fk.dest_table, fk.dest_column) for fk in self.database.get_foreign_keys(table)]

    def prepare(self, causal_reads: bool = True) -> None:
        """Per-database settings the storage relies on (SQLite pragmas; Galera's causal reads)."""

    # Lost connections (the storage's reconnect layer asks these; only after a statement failed).
    def is_connection_lost(self, exc: BaseException) -> bool:
        """True when `exc`, just raised on the calling thread, means its connection is gone
        (server restarted or killed, network cut) or the server cannot be reached now.

        Only errors that come from the driver count: peewee's own ("database not
        initialised", "connection not opened") are the caller's business.
        """
        if not isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
            return False
        err = getattr(exc, "orig", None)
        if err is None:
            return False
        db = self.database
        if db.is_closed():  # the error came from opening a connection
            return self._unreachable(err)
        return self._dead(db._state.conn, err)  # type: ignore[attr-defined]

    def was_not_sent(self, exc: BaseException) -> bool:
        """True when the statement that raised `exc` certainly never reached the server
        (the connection was already known dead, or could not be opened), so running it
        again cannot apply it twice."""
        return isinstance(exc, peewee.InterfaceError) or self.database.is_closed()

    def hung_up(self, conn: Any) -> bool:
        """True when the server may have closed the idle connection `conn` (its socket has
        unread input: a termination notice or end-of-file). One non-blocking `select`, no
        round trip; asked before statements that must not run twice."""
        return False

    def _dead(self, conn: Any, err: BaseException) -> bool:
        """True when the driver connection `conn` is unusable after `err`."""
        return False

    def _unreachable(self, err: BaseException) -> bool:
        """True when opening a connection failed because the server cannot be reached."""
        return False


class SqliteDialect(Dialect):
    """SQLite: JSON and timestamps as text (`...mmmZ`), foreign keys on, WAL, IMMEDIATE writes."""

    name = "sqlite"
    now_default = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
    single_writer = True
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

    def is_transient(self, exc: BaseException) -> bool:
        # SQLITE_BUSY once the busy timeout ran out: the writer lock is not granted in any
        # fair order, so a writer among many can miss it for the whole timeout. Nothing was
        # written; a single statement (or a transaction that could not begin) can run again.
        err = _driver_error(exc)
        code: Optional[int] = getattr(err, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF == 5
        return "database is locked" in str(err)

    def prepare(self, causal_reads: bool = True) -> None:
        # `permanent=True` records the pragma so every connection the database opens later
        # (one per thread) gets it too; the current connection gets it now.
        db = cast(peewee.SqliteDatabase, self.database)  # detect_dialect picks SQLite for these only
        if isinstance(db, PooledDatabase) and db.connect_params.get("check_same_thread", True):
            # The pool hands a connection made by one thread to another, which sqlite3 refuses
            # ("SQLite objects created in a thread can only be used in that same thread").
            raise DialectError(
                f"this pooled SQLite database ({type(db).__name__}) opens connections that only their "
                "own thread may use, but the pool hands them between threads: create it with "
                "check_same_thread=False (open_database(url, pooled=True) does)")
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
    dump_json = staticmethod(_dumps_for_jsonb)

    def select_json(self, column: peewee.Field) -> peewee.Node:
        # As text, so SQL NULL (absent) and JSON null (None) stay apart: the driver's
        # own jsonb decoding turns both into None.
        return peewee.Cast(column, "text")

    def foreign_keys(self, table: str) -> List[Tuple[str, str, str]]:
        # Not information_schema (peewee's way): it shows only constraints of tables the current
        # role owns, so a least-privilege runtime role would see no foreign key at all.
        cursor = self.database.execute_sql(
            "SELECT a.attname, r.relname, ra.attname FROM pg_constraint c"
            " JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
            " JOIN pg_class r ON r.oid = c.confrelid"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
            " JOIN pg_attribute ra ON ra.attrelid = c.confrelid AND ra.attnum = c.confkey[1]"
            " WHERE c.contype = 'f' AND t.relname = %s AND n.nspname = current_schema()", (table,))
        return [tuple(row) for row in cursor.fetchall()]

    def json_param(self, node: peewee.Node) -> peewee.Node:
        # An untyped parameter in a SELECT list resolves to text, which jsonb refuses.
        return peewee.Cast(node, "jsonb")

    def is_transient(self, exc: BaseException) -> bool:
        # serialization_failure, deadlock_detected
        return _pg_code(exc) in ("40001", "40P01")

    def is_read_only(self, exc: BaseException) -> bool:
        # read_only_sql_transaction: a hot standby, or default_transaction_read_only
        return _pg_code(exc) == "25006"

    def hung_up(self, conn: Any) -> bool:
        try:
            return _readable(conn.fileno())
        except Exception:  # closed: let the statement find out
            return False

    def _dead(self, conn: Any, err: BaseException) -> bool:
        # psycopg2 marks a broken connection closed (2); psycopg 3 sets `closed`/`broken`.
        if getattr(conn, "closed", 0) or getattr(conn, "broken", False):
            return True
        code = getattr(err, "pgcode", None) or getattr(err, "sqlstate", None)
        # 08P01 (protocol violation) on a connection the driver still holds open is about the
        # statement (pgbouncer refusing a prepared statement), not a dead connection.
        return code != "08P01" and _pg_gone_code(code)

    def _unreachable(self, err: BaseException) -> bool:
        # libpq reports connection failures without a SQLSTATE: recognise them by their text
        # (a wrong password or database name is not "unreachable").
        return (_pg_gone_code(getattr(err, "pgcode", None) or getattr(err, "sqlstate", None))
                or _PG_UNREACHABLE.search(str(err)) is not None)

    def rejected_json_column(self, exc: BaseException) -> Optional[str]:
        # 54001 "stack depth limit exceeded": jsonb parses recursively, and a value nested some
        # tens of thousands of levels deep exhausts max_stack_depth. The message names no column.
        return "" if _pg_code(exc) == "54001" else None

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        code: Optional[str] = getattr(getattr(exc, "orig", None), "pgcode", None) or getattr(exc, "pgcode", None)
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

    def text_equals(self, column: peewee.Node, value: peewee.Node) -> peewee.Node:
        # utf8mb4_bin is a PAD SPACE collation: `agent_name = 'agent'` also matches 'agent '.
        # The plain comparison keeps the index usable; the binary one makes the match exact.
        return (column == value) & (peewee.Cast(column, "BINARY") == peewee.Cast(value, "BINARY"))

    def text_order(self, column: peewee.Node) -> peewee.Node:
        # PAD SPACE again: 'a' and 'a ' tie, and 'a\t' sorts before 'a'. UTF-8 bytes sort by code point.
        return peewee.Cast(column, "BINARY")

    def upsert(self, insert: Any, key: peewee.Field, others: List[Any]) -> Any:
        # ON DUPLICATE KEY UPDATE names no target: every unique key of the table is one.
        return insert.on_conflict(preserve=others)

    def skip_duplicates(self, insert: Any) -> Any:
        # INSERT IGNORE would also turn other errors (truncation, bad values) into warnings:
        # leave the insert plain and let a duplicate raise IntegrityError.
        return insert

    def is_transient(self, exc: BaseException) -> bool:
        # ER_LOCK_DEADLOCK (also Galera's certification failure), ER_LOCK_WAIT_TIMEOUT: InnoDB
        # rolled the statement or transaction back. ER_UNKNOWN_COM_ERROR 1047: a Galera node
        # that is not synced ("WSREP has not yet prepared node for application use") ran nothing.
        return _mysql_errno(exc) in (1213, 1205, 1047)

    def needs_new_connection(self, exc: BaseException) -> bool:
        return _mysql_errno(exc) == 1047

    def is_read_only(self, exc: BaseException) -> bool:
        # ER_OPTION_PREVENTS_STATEMENT (--read-only), ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION,
        # ER_READ_ONLY_MODE
        return _mysql_errno(exc) in (1290, 1792, 1836)

    #: wsrep_sync_wait bits for causal reads: 1 reads (and BEGIN), 2 UPDATE/DELETE, 4 INSERT/REPLACE
    #: (the stream append's INSERT ... SELECT and a message's foreign-key check read through these).
    CAUSAL_READS = 7

    def prepare(self, causal_reads: bool = True) -> None:
        # On Galera every node takes writes but applies the others' asynchronously: without
        # wsrep_sync_wait a read on node 2 may not see a commit acknowledged by node 1. Each
        # connection the database opens gets the setting once (checked on first connect).
        if not causal_reads or getattr(self.database, "_bap_causal_hook", False):
            return
        database = self.database
        initialize = database._initialize_connection  # type: ignore[attr-defined]
        state: Dict[str, Any] = {"galera": None}

        def initialize_connection(conn: Any) -> None:
            initialize(conn)
            if getattr(conn, "_bap_sync_wait", False):
                return
            cursor = conn.cursor()
            try:
                if state["galera"] is None:
                    try:
                        cursor.execute("SELECT @@wsrep_on")
                        state["galera"] = str(cursor.fetchone()[0]).upper() in ("1", "ON")
                    except Exception:  # MySQL: no such variable (no Galera)
                        state["galera"] = False
                if state["galera"]:
                    cursor.execute("SET SESSION wsrep_sync_wait = %s", (self.CAUSAL_READS,))
            finally:
                cursor.close()
            try:
                conn._bap_sync_wait = True
            except AttributeError:  # a driver connection without a __dict__: set it each time
                pass

        database._initialize_connection = initialize_connection  # type: ignore[attr-defined]
        database._bap_causal_hook = True  # type: ignore[attr-defined]
        if not database.is_closed():
            initialize_connection(database._state.conn)  # type: ignore[attr-defined]

    def requires_primary_key(self) -> bool:
        # MySQL 8: sql_require_primary_key; MariaDB: innodb_force_primary_key, and on Galera
        # wsrep_mode=REQUIRED_PRIMARY_KEY. A variable the server lacks reads as off.
        for sql in ("SELECT @@sql_require_primary_key", "SELECT @@innodb_force_primary_key",
                    "SELECT @@wsrep_on AND FIND_IN_SET('REQUIRED_PRIMARY_KEY', @@wsrep_mode)"):
            try:
                row = self.database.execute_sql(sql).fetchone()
            except peewee.DatabaseError:
                continue
            if row and row[0] and str(row[0]).upper() not in ("0", "OFF"):
                return True
        return False

    def is_galera(self) -> bool:
        """True when the server is a Galera cluster node (wsrep_on). One query."""
        try:
            row = self.database.execute_sql("SELECT @@wsrep_on").fetchone()
        except peewee.DatabaseError:
            return False
        return str(row[0]).upper() in ("1", "ON")

    def was_not_sent(self, exc: BaseException) -> bool:
        # 2006 "server has gone away" is raised when writing the statement failed.
        return super().was_not_sent(exc) or _mysql_errno(exc) == 2006

    def hung_up(self, conn: Any) -> bool:
        sock = getattr(conn, "_sock", None)  # PyMySQL
        try:
            return _readable(sock.fileno() if sock is not None else conn.fileno())
        except Exception:
            return False

    def _dead(self, conn: Any, err: BaseException) -> bool:
        # PyMySQL drops its socket (`open` False) when the connection breaks; mysqlclient
        # keeps `open` true, so the error codes decide too.
        if not getattr(conn, "open", True):
            return True
        args: Tuple[Any, ...] = getattr(err, "args", ())
        return bool(args) and args[0] in _MYSQL_GONE

    def _unreachable(self, err: BaseException) -> bool:
        args: Tuple[Any, ...] = getattr(err, "args", ())
        return bool(args) and args[0] in _MYSQL_UNREACHABLE

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        args = getattr(getattr(exc, "orig", None), "args", None) or getattr(exc, "args", ())
        if args and isinstance(args[0], int):
            return args[0] in (1451, 1452)
        return "foreign key constraint" in str(exc)

    def rejected_json_column(self, exc: BaseException) -> Optional[str]:
        # MariaDB's JSON is LONGTEXT CHECK (JSON_VALID(col)), and JSON_VALID refuses nesting
        # deeper than 31 levels: error 4025 "CONSTRAINT `table.column` failed". (MySQL: 3157.)
        args = getattr(getattr(exc, "orig", None), "args", None) or getattr(exc, "args", ())
        if not args or args[0] not in (4025, 3157):
            return None
        match = re.search(r"`[^`.]+\.([^`]+)`", str(args[1]) if len(args) > 1 else "")
        return match.group(1) if match else ""


_BY_NAME: Dict[str, Type[Dialect]] = {"sqlite": SqliteDialect, "postgres": PostgresDialect, "mysql": MySQLDialect}
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
