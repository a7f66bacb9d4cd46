"""Statements compiled once from the models, and `list` queries translated to SQL.

Peewee's query builder writes every statement (quoting, upsert form, NULLS LAST
emulation on MySQL), but only once per database and statement shape: each query is
compiled with placeholder markers, and the hot path just binds values into the
resulting SQL ("The interface" in docs/contract.md; building queries per call would cost
about 15 times the SQL itself, see docs/performance.md).
"""
from __future__ import annotations

import threading
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
)

import peewee

from .checks import is_int
from .dialects import Dialect
from .errors import QueryError
from .records import TableSpec, check_ts, string_problem

__all__ = ["Statement", "compile_statement", "marker", "ListCompiler", "MultiRowInsert"]

_MARK = "\x00bap-param-"


def marker(name: str) -> peewee.Value:
    """A named placeholder for `compile_statement`: a parameter whose value is bound later."""
    return peewee.Value(_MARK + name, converter=False)


class Statement(NamedTuple):
    """SQL compiled once, and how to turn named values into its parameter list."""

    sql: str
    #: For each driver parameter: the name of the bound value, or a constant (``(value,)``).
    plan: Tuple[Any, ...]
    #: The names in parameter order when every parameter is a bound value, else None.
    names: Optional[Tuple[str, ...]]

    def params(self, values: Mapping[str, Any]) -> List[Any]:
        """The driver parameters for `values` (name -> value)."""
        return [values[p] if isinstance(p, str) else p[0] for p in self.plan]


def compile_statement(database: peewee.Database, query: peewee.Node) -> Statement:
    """Compile a peewee query whose variable parts are `marker`s into a reusable `Statement`."""
    sql, params = database.get_sql_context().sql(query).query()
    plan: List[Any] = []
    for p in params:
        if isinstance(p, str) and p.startswith(_MARK):
            plan.append(p[len(_MARK):])
        else:
            plan.append((p,))  # a constant peewee chose to bind (e.g. NULLS LAST emulation)
    names = tuple(plan) if all(isinstance(p, str) for p in plan) else None
    return Statement(sql, tuple(plan), names)


def select_columns(model: Type[peewee.Model], spec: TableSpec, dialect: Dialect) -> List[peewee.Node]:
    """The SELECT list for `spec`'s row tuple, JSON columns as the dialect wants them read."""
    fields = {f.column_name: f for f in model._meta.sorted_fields}
    return [dialect.select_json(fields[c]) if c in spec.json_columns else fields[c] for c in spec.columns]


_QUERY_KEYS = frozenset(("where", "orderBy", "take"))
_MAX_INT = 2**63 - 1
_DIRECTIONS = ("asc", "desc")
_MAX_SHAPES = 512


class ListCompiler:
    """Translates `list` queries of one table to SQL, caching the SQL per query shape.

    The shape is which fields are filtered (and whether against NULL), the ordering and
    whether there is a `take`; values are always bound parameters. Every field name is
    checked against the table's whitelist before it can reach SQL.
    """

    def __init__(self, database: peewee.Database, dialect: Dialect, model: Type[peewee.Model],
                 spec: TableSpec) -> None:
        self._database = database
        self._dialect = dialect
        self._model = model
        self._spec = spec
        self._fields = {f.column_name: f for f in model._meta.sorted_fields}
        self._columns = select_columns(model, spec, dialect)
        self._cache: Dict[Any, Statement] = {}
        self._lock = threading.Lock()

    def _error(self, message: str, with_fields: bool = True) -> QueryError:
        return QueryError(self._spec.name, message, self._spec.queryable if with_fields else None)

    def _column(self, field: Any, clause: str) -> Any:
        try:
            return self._spec.queryable[field]
        except (KeyError, TypeError):
            raise self._error(f"{clause} names {field!r:.80}, "
                              f"which is not a field of {self._spec.name}") from None

    def _bind(self, field: str, kind: str, value: Any) -> Any:
        """Check a `where` value against the field's kind and encode it for the driver."""
        if kind == "ts":
            if not is_int(value):
                raise self._error(f"where.{field} must be an integer timestamp (epoch ms) or None, "
                                  f"got {value!r:.80}", False)
            try:
                return self._dialect.encode_ts(check_ts(self._spec.name, field, value))
            except Exception as exc:  # out of range: no record can match, but say so clearly
                raise self._error(f"where.{field}: {exc}", False) from None
        if kind == "int":
            if not is_int(value):
                raise self._error(f"where.{field} must be an integer or None, got {value!r:.80}", False)
            if not -_MAX_INT - 1 <= value <= _MAX_INT:  # SQLite cannot even bind it
                raise self._error(f"where.{field}: {value} is outside the 64-bit integer range", False)
            return value
        if not isinstance(value, str):
            raise self._error(f"where.{field} must be a string or None, got {value!r:.80}", False)
        if "\x00" in value or not value.isascii():
            # A NUL: PostgreSQL's driver cannot even bind it; a lone surrogate: no driver can
            # send it. Refused alike everywhere: no record can hold either.
            problem = string_problem(value)
            if problem:
                raise self._error(f"where.{field} {problem}", False)
        return value

    def compile(self, query: Optional[Mapping[str, Any]]) -> Tuple[str, List[Any]]:
        """SQL and parameters for a `list` query ("The interface" in docs/contract.md), or QueryError."""
        # `type(x) is dict` before each isinstance: isinstance against typing.Mapping costs
        # ~0.4 us, and this runs on every `list` call (docs/performance.md).
        if query is None:
            query = {}
        elif type(query) is not dict and not isinstance(query, Mapping):
            raise self._error(f"the query must be a dict with where/orderBy/take, got {type(query).__name__}",
                              False)
        if not _QUERY_KEYS.issuperset(query):
            unknown = [k for k in query if k not in _QUERY_KEYS]
            raise self._error(f"unknown query key {unknown[0]!r}: a query has where, orderBy and take", False)

        where = query.get("where") or {}
        order = query.get("orderBy") or {}
        take = query.get("take")
        if type(where) is not dict and not isinstance(where, Mapping):
            raise self._error(f"where must be a dict of field -> value, got {type(where).__name__}", False)
        if type(order) is not dict and not isinstance(order, Mapping):
            raise self._error(f"orderBy must be a dict of field -> 'asc'/'desc', got {type(order).__name__}",
                              False)
        if take is not None and (not is_int(take) or take < 0):
            raise self._error(f"take must be a non-negative integer, got {take!r:.80}", False)

        values: Dict[str, Any] = {}
        where_shape: List[Tuple[str, Optional[str]]] = []  # (column, parameter name; None: IS NULL)
        for i, (field, value) in enumerate(where.items()):
            col = self._column(field, "where")
            if value is None:
                where_shape.append((col.column, None))
            else:
                values[f"w{i}"] = self._bind(field, col.kind, value)
                where_shape.append((col.column, f"w{i}"))
        order_shape = []
        for field, direction in order.items():
            col = self._column(field, "orderBy")
            if direction not in _DIRECTIONS:
                raise self._error(f"orderBy.{field} must be 'asc' or 'desc', got {direction!r:.80}", False)
            order_shape.append((col.column, direction))
        if take is not None:
            values["take"] = min(take, _MAX_INT)  # more than any table holds; every driver can bind it

        shape = (tuple(where_shape), tuple(order_shape), take is not None)
        statement = self._cache.get(shape)
        if statement is None:
            statement = self._build(shape)
        return statement.sql, statement.params(values)

    def _build(self, shape: Any) -> Statement:
        where_shape, order_shape, has_take = shape
        f = self._fields
        d = self._dialect
        text = {c.column for c in self._spec.queryable.values() if c.kind == "text"}
        q = self._model.select(*self._columns)
        conditions = [f[col].is_null() if name is None
                      else d.text_equals(f[col], marker(name)) if col in text  # exact on MySQL too
                      else f[col] == marker(name)
                      for col, name in where_shape]
        if conditions:
            q = q.where(*conditions)
        if order_shape:
            # NULLs sort last in both directions on every dialect ("The interface"); text by code point.
            # A NOT NULL column has no NULL to place: a NULLS LAST clause (or MySQL's CASE emulation
            # of it) would only stop the planner from reading an index in order.
            q = q.order_by(*[getattr(d.text_order(f[col]) if col in text else f[col], direction)(
                nulls="last" if f[col].null else None) for col, direction in order_shape])
        if has_take:
            q = q.limit(marker("take"))
        statement = compile_statement(self._database, q)
        with self._lock:
            if len(self._cache) >= _MAX_SHAPES:
                self._cache.clear()
            self._cache[shape] = statement
        return statement


#: Most rows (and about the most bytes of JSON) in one multi-row INSERT.
CHUNK_ROWS = 100
CHUNK_BYTES = 1 << 20


class MultiRowInsert:
    """Multi-row INSERTs into one table: the statement for n rows compiled once per n, and
    rows cut into chunks of at most `CHUNK_ROWS` rows (or about `CHUNK_BYTES` of JSON)."""

    def __init__(self, database: peewee.Database, model: Type[peewee.Model], fields: Sequence[peewee.Field],
                 wrap: Callable[[Any], Any] = lambda insert: insert) -> None:
        """:param fields: the columns each row gives, in row order.
        :param wrap: turns the INSERT into the statement to run (say, one that skips duplicates)."""
        self._database = database
        self._model = model
        self._fields = list(fields)
        self._wrap = wrap
        self._sql: Dict[int, str] = {}
        self._lock = threading.Lock()

    def sql(self, count: int) -> str:
        """The INSERT of `count` rows, taking their values flattened row after row."""
        sql = self._sql.get(count)
        if sql is None:
            rows = [{f: marker(f"{f.name}.{i}") for f in self._fields} for i in range(count)]
            insert = self._wrap(self._model.insert_many(rows)).returning()
            statement = compile_statement(self._database, insert)
            if statement.names != tuple(f"{f.name}.{i}" for i in range(count) for f in self._fields):
                raise AssertionError(f"multi-row insert parameters out of order: {statement.plan[:10]}")
            sql = statement.sql
            with self._lock:
                self._sql[count] = sql
        return sql

    @staticmethod
    def chunks(rows: Iterable[Sequence[Any]], sized_by: int) -> Iterator[Tuple[int, List[Any]]]:
        """(row count, flattened values) per chunk of `rows`; `sized_by` is the index of the
        (JSON text) value whose length counts towards `CHUNK_BYTES`."""
        chunk: List[Any] = []
        count = size = 0
        for row in rows:
            chunk.extend(row)
            count += 1
            size += len(row[sized_by])
            if count == CHUNK_ROWS or size >= CHUNK_BYTES:
                yield count, chunk
                chunk, count, size = [], 0, 0
        if count:
            yield count, chunk


def first_row(cursor: Any) -> Optional[Sequence[Any]]:
    """The first row of `cursor`, reading it to the end so SQLite releases the statement."""
    rows = cursor.fetchall()
    return rows[0] if rows else None
