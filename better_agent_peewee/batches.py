"""What the housekeeping jobs (prune.py, reap.py) share: cutoffs, keyset pages, chunked IN lists.

Both work in batches of ids: a page is chosen by keyset (``key > last ORDER BY key LIMIT n``)
and acted on by an explicit id list, sent in chunks, which keeps memory bounded and suits
MySQL, which allows neither LIMIT in an ``IN (subquery)`` nor deleting from a table the same
statement selects from.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable, List, Optional, Sequence

import peewee

from .executor import Executor
from .timestamps import MAX_TIMESTAMP_MS
from .timestamps import now_ms as clock_ms

__all__ = ["COUNT", "IN_CHUNK", "chunks", "cutoff", "delete_in", "delete_or_count", "exists", "page",
           "select_in"]

#: IN lists are sent in chunks of this many parameters: SQLite builds before 3.32 allow only
#: 999 parameters per statement, and very long lists plan badly everywhere.
IN_CHUNK = 500
#: ``COUNT(*)``.
COUNT = peewee.fn.COUNT(peewee.SQL("*"))


def exists(query: peewee.Query) -> Any:
    """``EXISTS (query)``."""
    return peewee.fn.EXISTS(query)


def page(query: peewee.Query, key: peewee.Field, after: Optional[str], size: int,
         ordered: bool = True) -> peewee.Query:
    """The next `size` rows after key `after`, in key order (keyset pagination); unordered,
    any `size` rows (for a loop whose every page stops matching: deleted or updated)."""
    if not ordered:
        return query.limit(size)
    if after is not None:
        query = query.where(key > after)
    return query.order_by(key).limit(size)


def chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    """`ids` in slices of at most `IN_CHUNK`."""
    for start in range(0, len(ids), IN_CHUNK):
        yield ids[start:start + IN_CHUNK]


def select_in(executor: Executor, column: peewee.Field, key: peewee.Field, ids: Sequence[Any]) -> List[Any]:
    """`column` of the rows whose `key` is in `ids`."""
    found: List[Any] = []
    for chunk in chunks(ids):
        found += [value for (value,) in executor.rows(column.model.select(column).where(key.in_(chunk)))]
    return found


def delete_in(executor: Executor, model: Any, key: peewee.Field, ids: Sequence[Any],
              extra: Sequence[Any] = ()) -> int:
    """DELETE the rows of `model` whose `key` is in `ids` and that match `extra`; how many."""
    # A conditional DELETE by key: running it again deletes nothing more.
    return sum(int(executor.execute_query(model.delete().where(key.in_(chunk), *extra),
                                          idempotent=True).rowcount)
               for chunk in chunks(ids))


def delete_or_count(executor: Executor, model: Any, key: peewee.Field, ids: Sequence[Any], dry_run: bool,
                    extra: Sequence[Any] = ()) -> int:
    """`delete_in`, or with `dry_run` COUNT the rows it would delete (writing nothing); how many."""
    if not dry_run:
        return delete_in(executor, model, key, ids, extra)
    return sum(int(executor.rows(model.select(COUNT).where(key.in_(chunk), *extra))[0][0])
               for chunk in chunks(ids))


def cutoff(delta: Any, now_ms: Optional[int], name: str) -> int:
    """Epoch ms `delta` before `now_ms` (default: the clock), within what a timestamp can hold.

    :raises TypeError: `delta` is not a `timedelta` (named `name` in the message).
    :raises ValueError: `delta` is negative.
    """
    if not isinstance(delta, _dt.timedelta):
        raise TypeError(f"{name} must be a datetime.timedelta, got {type(delta).__name__}")
    if delta < _dt.timedelta(0):
        raise ValueError(f"{name} must not be negative, got {delta}")
    if now_ms is None:
        now_ms = clock_ms()
    # Stored timestamps lie in 0..MAX_TIMESTAMP_MS (1970..9999); a cutoff outside would not encode.
    return min(max(now_ms - delta // _dt.timedelta(milliseconds=1), 0), MAX_TIMESTAMP_MS)
