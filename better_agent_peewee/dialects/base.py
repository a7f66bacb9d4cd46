"""The base `Dialect`: what every database does alike, and the defaults the others override.

A `Dialect` answers these questions for the rest of the package:

* which column types the five tables use ("Physical schema" and "Encodings" in docs/contract.md),
* which timestamp and JSON codecs turn record values into driver parameters and back
  (the codecs themselves live in `timestamps` and `jsoncodec`),
* how a multi-statement transaction is opened, and what a driver error means (the
  classifiers live in `driver_errors`),
* what each connection needs before its first statement (`set_up_connection`),
* how the stream poller reads and is woken (the follower SQL of each database).

Nothing outside the `dialects` package asks "which database am I?": the streams, their
followers and the schema set-up ask capability flags and methods instead.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, ContextManager, Dict, List, Optional, Set, Tuple, Type, cast

import peewee

from ..jsoncodec import dumps, load_text
from ..timestamps import datetime_to_ms, postgres_encode_ts
from .aggregates import Aggregates
from .polling import PollReader, Runner

logger = logging.getLogger(__name__)

__all__ = ["Dialect", "DialectField", "TimestampField", "JSONField", "prefix_range", "prefix_successor"]


# -- column types -------------------------------------------------------------------------

class DialectField(peewee.Field):
    """A column whose DDL type is given verbatim by the dialect, converting nothing itself."""

    field_type = "TEXT"


class TimestampField(DialectField):
    """Epoch-ms integers in Python, the dialect's timestamp type in the database."""

    encode: Callable[[int], Any] = staticmethod(postgres_encode_ts)
    decode: Callable[[Any], int] = staticmethod(datetime_to_ms)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, peewee.Node):
            return value
        return self.encode(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else self.decode(value)


class JSONField(DialectField):
    """Any JSON value in Python, the dialect's JSON type in the database."""

    load: Callable[[Any], Any] = staticmethod(load_text)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, peewee.Node):
            return value
        return dumps(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else self.load(value)



# -- the dialects -------------------------------------------------------------------------

class Dialect(Aggregates):
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

    # What the streams, their followers and the schema set-up do differently (streams.py,
    # poller.py, schema.py ask these rather than the dialect's name).
    #: The clause holding a row shared while a write depends on it (a stream's, a run's, a thread's):
    #: a racing close or end waits. None where one writer at a time makes it needless (SQLite).
    row_share_lock: Optional[str] = None
    #: Appends and closes NOTIFY the pollers of every process in the same statement
    #: (`notify_sql`), and the pollers listen for it (PostgreSQL).
    notifies_appends = False
    #: The database library runs inside this process and takes process-wide locks while it works
    #: (SQLite's mutexes): a fork() must wait until the stream poller is out of its statement.
    #: (A network driver's child gets a connection of its own; the inherited one is never used.)
    fork_waits_for_statements = False
    #: CREATE INDEX CONCURRENTLY exists (outside a transaction; an interrupted build leaves one invalid).
    can_build_index_concurrently = False
    pads_spaces = False  # text compares as if the shorter were padded with spaces (`prefix_range`)

    encode_ts: Callable[[int], Any] = staticmethod(postgres_encode_ts)
    decode_ts: Callable[[Any], int] = staticmethod(datetime_to_ms)
    #: Decodes a JSON column as our statements select it (see `select_json`).
    load_json: Callable[[Any], Any] = staticmethod(load_text)
    #: Decodes a JSON column as the driver returns it for a plain peewee query.
    field_load_json: Callable[[Any], Any] = staticmethod(load_text)
    dump_json: Callable[[Any], str] = staticmethod(dumps)

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self._field_classes = self._make_field_classes()

    def __repr__(self) -> str:
        return f"<Dialect {self.name}>"

    # Column factories: the models call these, so the DDL of every table comes from here.
    def _make_field_classes(self) -> Dict[str, Type[peewee.Field]]:
        dialect = self

        class TimestampColumn(TimestampField):
            field_type = dialect.timestamp_type
            encode = staticmethod(dialect.encode_ts)
            decode = staticmethod(dialect.decode_ts)

        class JSONColumn(JSONField):
            field_type = dialect.json_type
            load = staticmethod(dialect.field_load_json)

        class KeyColumn(DialectField):
            field_type = dialect.key_type

        class TextColumn(DialectField):
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
        """True when `exc` is a deadlock or serialization failure (rolled back: may succeed again)."""
        return False

    def is_read_only(self, exc: BaseException) -> bool:
        """True when `exc` says the server (a standby, a replica) takes no writes."""
        return False

    def is_missing_table(self, exc: BaseException) -> bool:
        """True when `exc` says a table the statement names does not exist."""
        return False

    def needs_new_connection(self, exc: BaseException) -> bool:
        """True when the conflict `exc` means this connection's server cannot serve now (a cluster
        node not synced), so a retry should reconnect (through a proxy: to another node)."""
        return False

    def requires_primary_key(self) -> bool:
        """True when the server refuses to create a table without a primary key."""
        return False

    def collation_problems(self, tables: List[str]) -> List[str]:
        """Key columns of `tables` whose collation would merge distinct ids, in words (with the fix)."""
        return []

    def json_param(self, node: peewee.Node) -> peewee.Node:
        """A JSON parameter where the server cannot infer its type (an INSERT ... SELECT's list)."""
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
        """Per-database settings the storage relies on (SQLite's permanent pragmas, a hook Peewee
        documents); `causal_reads`: see `set_up_connection`."""

    # Per-connection setup: the executor asks these the first time it uses each connection; the
    # user's database object is never changed for it.
    @property
    def sets_up_connections(self) -> bool:
        """True while the executor must call `set_up_connection` on each connection before its
        first statement."""
        return False

    def set_up_connection(self, conn: Any) -> bool:
        """Apply per-connection settings to the driver connection `conn` (Galera's causal reads).
        Returns False when no later connection of this database needs any (the executor stops
        asking)."""
        return False

    def invalid_indexes(self, table: str) -> Set[str]:
        """Names of `table`'s indexes left invalid by an interrupted concurrent build."""
        return set()

    # Streams, followers and indexes.
    def build_poll_sql(self, models: Any) -> str:
        """The stream poller's statement over the stream tables of `models` (see poller.py).

        Every read of stream_events goes through the unique (run_id, seq) index, bounded: the last
        seq is one index entry read backwards, the events a range of it. (MariaDB and SQLite would
        otherwise pick the run_id index and read every event of the stream.)
        """
        raise NotImplementedError(f"{type(self).__name__} has no poll statement")

    def poll_reader(self, runner: Runner, models: Any, connect: Callable[[], Any]) -> PollReader:
        """The stream poller's reader and wake-up source for this database (dialects/polling.py)."""
        return PollReader(runner, self, models, connect)

    def notify_sql(self, returning_sql: str) -> str:
        """`returning_sql` (an INSERT/UPDATE ... RETURNING the run id) made to wake the pollers of
        every process for each row it writes, in the same statement; its row count stays the rows
        written. Unchanged where pollers are not woken that way (`notifies_appends` false)."""
        return returning_sql

    def per_connection_database(self) -> bool:
        """True when each connection sees a database of its own (in-memory SQLite): followers
        then poll on their own thread."""
        return False

    def driver_fd(self, conn: Any) -> Optional[int]:
        """The socket of the driver connection `conn`, or None (an embedded database). A forked
        child points it at /dev/null, so it can never talk on its parent's connection."""
        return int(conn.fileno()) if hasattr(conn, "fileno") else None

    def drop_index_sql(self, index: str, table: str) -> str:
        """DROP INDEX of the quoted `index` on the quoted `table`."""
        return f"DROP INDEX {index}"

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



def prefix_range(prefix: str, longest: int, pads_spaces: bool) -> Tuple[str, Optional[str]]:
    """``(low, high)``: the key column values that start with `prefix` lie in ``>= low`` and
    ``< high`` (None: no upper end) of a code point order (`pads_spaces`: MySQL/MariaDB's
    ``utf8mb4_bin``, PAD SPACE), for keys of at most `longest` characters without NUL (what
    `records` accepts); an index range finds them. With `pads_spaces` the range may also hold
    the prefix without its trailing spaces: callers keep only the values that start with it.
    """
    if pads_spaces:
        # A value compares as if padded with spaces, so 'ab\x01' sorts before 'ab' (a range from
        # 'ab' would miss it): the low end is the least key of `longest` characters with the
        # prefix, the prefix and then U+0001s (no key holds NUL).
        return prefix + "\x01" * max(0, longest - len(prefix)), prefix_successor(prefix)
    return prefix, prefix_successor(prefix)


def prefix_successor(prefix: str) -> Optional[str]:
    """The least string greater (by code point) than every string that starts with `prefix`:
    its last character raised by one (past the surrogates, which no key holds), or None when
    every character is U+10FFFF (nothing is greater)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            chars.append(chr(0xE000 if last == 0xD7FF else last + 1))
            return "".join(chars)
    return None
