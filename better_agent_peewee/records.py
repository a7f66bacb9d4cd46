"""Row <-> record mappers: one pair of pure functions per logical table.

A record is the dict Better Agent uses (camelCase keys, epoch-ms timestamps); a row is
the tuple of column values in the order of `TableSpec.columns`. `to_row` validates the
record completely before anything reaches the database, so bad input raises
`RecordError` and writes nothing. The value codecs (timestamps, JSON) come from the
dialect; nothing here knows which database it is.
"""
from __future__ import annotations

import math
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    cast,
    get_args,
)

from .checks import is_int
from .dialects import Dialect
from .errors import RecordError
from .models import (
    REFERENCE_MODELS,
    json_columns,
    key_column,
    logical_name,
    queryable_columns,
    record_fields,
    row_columns,
)
from .timestamps import MAX_TIMESTAMP_MS, now_ms
from .types import RunStatus, StreamStatus

__all__ = ["TableSpec", "QueryField", "TABLES", "RUN_STATUSES", "STREAM_STATUSES", "FINISHED_STATUSES",
           "FINAL_EVENT_OF", "Mapper", "now_ms"]

#: What a run's and a stream's `status` may be: the `types` literals, as tuples.
RUN_STATUSES: Tuple[str, ...] = get_args(RunStatus)
STREAM_STATUSES: Tuple[str, ...] = get_args(StreamStatus)
#: A finished run's status -> the type of the final event it ends with ("Runs" in docs/contract.md).
FINAL_EVENT_OF: Mapping[str, str] = {"completed": "RUN_FINISHED", "interrupted": "RUN_FINISHED",
                                     "failed": "RUN_ERROR", "aborted": "RUN_ERROR"}
FINISHED_STATUSES: Tuple[str, ...] = tuple(s for s in RUN_STATUSES if s in FINAL_EVENT_OF)
FINAL_EVENT_TYPES: Tuple[str, ...] = tuple(dict.fromkeys(FINAL_EVENT_OF.values()))

#: Longest id or indexed string: the VARCHAR(255) of MySQL, enforced on every dialect alike.
MAX_KEY_LENGTH = 255
MAX_SEQ = 2**31 - 1

Row = Tuple[Any, ...]
Record = Dict[str, Any]


class QueryField(NamedTuple):
    """A record field stored in its own column, so `list` may filter and order on it."""

    field: str
    column: str
    kind: str  # "text", "int" or "ts"


class Mapper(NamedTuple):
    """The pair of pure functions between a record and a row, bound to one dialect's codecs."""

    to_row: Callable[[str, Any], Row]
    from_row: Callable[[Row], Record]


class TableSpec(NamedTuple):
    """One logical table: names, key, columns, the fields `list` accepts, and its mapper.

    Derived from the table's model (`models.build_models`), never written by hand.
    """

    name: str
    table: str
    key_field: str
    key_column: str
    columns: Tuple[str, ...]
    json_columns: Tuple[str, ...]
    queryable: Mapping[str, QueryField]
    #: The record fields stored in columns of their own (a record may hold no others,
    #: except a message, whose other fields go to its JSON column).
    fields: FrozenSet[str]
    make_mapper: Callable[[Dialect], Mapper]


# -- validation helpers (each raises RecordError naming table and field) --------------------

def _fail(table: str, field: Optional[str], message: str) -> RecordError:
    return RecordError(table, field, message)


def string_problem(value: str) -> Optional[str]:
    """Why no dialect can store the string `value`, or None: a NUL character (PostgreSQL
    refuses it, so every dialect does) or a lone surrogate (not valid Unicode)."""
    if "\x00" in value:
        return "contains a NUL character (U+0000), which PostgreSQL cannot store"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate, which is not valid Unicode"
    return None


def check_text(table: str, field: str, value: Any, limit: Optional[int] = MAX_KEY_LENGTH,
               allow_empty: bool = True) -> str:
    """`value` if it is a string every dialect can store, else RecordError."""
    if type(value) is not str:
        if isinstance(value, str):
            value = str(value)
        else:
            raise _fail(table, field, f"must be a string, got {type(value).__name__}: {value!r:.80}")
    if limit is not None and len(value) > limit:
        raise _fail(table, field, f"is {len(value)} characters long; at most {limit} can be stored")
    if not value and not allow_empty:
        raise _fail(table, field, "must not be empty")
    if "\x00" in value or not value.isascii():  # the common case (ASCII, no NUL) costs no call
        problem = string_problem(value)
        if problem:
            raise _fail(table, field, problem)
    return cast(str, value)


def check_key(table: str, field: str, value: Any) -> str:
    """A record id: a non-empty string of at most 255 characters, not ending in a space."""
    value = check_text(table, field, value, allow_empty=False)
    if value[-1] == " ":
        # MySQL/MariaDB collations (utf8mb4_bin included) are PAD SPACE: "a" and "a " are the
        # same key there, so storing one would overwrite the other. Refused everywhere alike.
        raise _fail(table, field,
                    f"{value!r:.80} ends with a space; MySQL/MariaDB would treat it as the same "
                    "id as without the space, so ids must not end with one")
    return cast(str, value)


def storable_key(key: Any) -> bool:
    """True when some record could be stored under `key` (see `check_key`); reads of any
    other key find nothing, deletes delete nothing."""
    if not isinstance(key, str) or key.endswith(" "):
        return False
    # A NUL or a lone surrogate: no record holds one (no driver can even send the latter).
    return key.isascii() and "\x00" not in key or string_problem(key) is None


def check_ts(table: str, field: str, value: Any) -> int:
    """An epoch-ms timestamp: an int (not bool) that every dialect can hold."""
    if type(value) is not int:
        if not is_int(value):
            raise _fail(table, field,
                        f"must be an integer timestamp (epoch milliseconds), "
                        f"got {type(value).__name__}: {value!r:.80}")
        value = int(value)
    if not 0 <= value <= MAX_TIMESTAMP_MS:
        raise _fail(table, field, f"timestamp {value} is outside 0..{MAX_TIMESTAMP_MS} (1970 to 9999)")
    return cast(int, value)


def check_choice(table: str, field: str, value: Any, choices: Tuple[str, ...]) -> str:
    """One of `choices`."""
    if value not in choices or type(value) is not str:
        raise _fail(table, field, f"must be one of {', '.join(choices)}, got {value!r:.80}")
    return value


def _bad_scalar(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return string_problem(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"contains {value!r}; JSON (and PostgreSQL) have no NaN or Infinity"
    if value is None or isinstance(value, (bool, int, float)):
        return None
    return f"contains a {type(value).__name__}, which is not JSON-serialisable"


def _find_bad_json(value: Any, depth: int = 0) -> Optional[str]:
    """Why `value` cannot be stored as JSON, or None. Only called once encoding has failed.

    Walks with an explicit stack (in document order): the value may be nested deeper
    than Python's recursion limit.
    """
    stack: List[Iterator[Any]] = [iter((value,))]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    return f"has a non-string object key {key!r}; JSON object keys are strings"
            stack.append(iter([x for pair in item.items() for x in pair]))  # key, value, key, ...
        elif isinstance(item, (list, tuple)):
            stack.append(iter(item))
        else:
            problem = _bad_scalar(item)
            if problem:
                return problem
    return None


_END = object()


def make_json_check(dialect: Dialect) -> Callable[[str, str, Any], str]:
    """A function encoding a JSON value for `dialect`, raising RecordError when it cannot be stored."""
    dump = dialect.dump_json

    def check_json(table: str, field: str, value: Any) -> str:
        try:
            text = dump(value)
        except RecursionError:
            raise _fail(table, field, "is nested too deeply to encode as JSON") from None
        except (ValueError, TypeError) as exc:
            raise _fail(table, field, _find_bad_json(value) or f"cannot be encoded as JSON: {exc}") from None
        # The encoder escapes U+0000 as \u0000; look closer only when that text appears.
        if "\\u0000" in text:
            problem = _find_bad_json(value)
            if problem:
                raise _fail(table, field, problem)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(table, field, _find_bad_json(value) or "is not valid Unicode") from None
        return text

    return check_json


def _no_unknown(table: str, record: Mapping[str, Any], allowed: FrozenSet[str]) -> None:
    if allowed.issuperset(record):  # the common case, checked in C
        return
    extra = [k for k in record if k not in allowed]
    if extra:
        raise _fail(table, repr(extra[0]).strip("'"),
                    f"unknown field; the fields of {table} are {', '.join(sorted(allowed))}")


def _need(table: str, record: Mapping[str, Any], field: str) -> Any:
    try:
        value = record[field]
    except KeyError:
        raise _fail(table, field, "is required") from None
    if value is None:
        raise _fail(table, field, "is required and must not be None")
    return value


def _record(table: str, value: Any) -> Mapping[str, Any]:
    # `type is dict` first: isinstance against typing.Mapping costs ~0.4 us per call.
    if type(value) is not dict and not isinstance(value, Mapping):
        raise _fail(table, None, f"a record must be a dict, got {type(value).__name__}")
    return value


def _same_key(table: str, field: str, given: Any, key: str) -> None:
    if given != key:
        raise _fail(table, field, f"is {given!r:.80} but the record is being stored under id {key!r:.80}")


# -- the five mappers ------------------------------------------------------------------------



def thread_mapper(dialect: Dialect) -> Mapper:
    """memoryThreads <-> threads(id, agent_name, scope, title, state, metadata, created_at, updated_at)."""
    T = "memoryThreads"
    fields = TABLES[T].fields
    ts_in, ts_out, load = dialect.encode_ts, dialect.decode_ts, dialect.load_json
    check_json = make_json_check(dialect)

    def to_row(key: str, value: Any) -> Row:
        r = _record(T, value)
        _no_unknown(T, r, fields)
        key = check_key(T, "id", key)
        if "id" in r:
            _same_key(T, "id", r["id"], key)
        agent = check_text(T, "agentName", _need(T, r, "agentName"))
        scope = r.get("scope")
        title = r.get("title")
        metadata = r.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise _fail(T, "metadata", f"must be a JSON object (dict), got {type(metadata).__name__}")
        return (
            key,
            agent,
            None if scope is None else check_text(T, "scope", scope),
            None if title is None else check_text(T, "title", title, limit=None),
            # An explicit None is JSON null (it reads back as None); an absent key is SQL NULL.
            check_json(T, "state", r["state"]) if "state" in r else None,
            None if metadata is None else check_json(T, "metadata", metadata),
            ts_in(check_ts(T, "createdAt", _need(T, r, "createdAt"))),
            ts_in(check_ts(T, "updatedAt", _need(T, r, "updatedAt"))),
        )

    def from_row(row: Row) -> Record:
        id_, agent, scope, title, state, metadata, created, updated = row
        rec: Record = {"id": id_}
        if agent is not None:
            rec["agentName"] = agent
        if scope is not None:
            rec["scope"] = scope
        if title is not None:
            rec["title"] = title
        if state is not None:
            rec["state"] = load(state)
        if metadata is not None:
            rec["metadata"] = load(metadata)
        rec["createdAt"] = ts_out(created)
        rec["updatedAt"] = ts_out(updated)
        return rec

    return Mapper(to_row, from_row)


_MESSAGE_COLUMNS = ("threadId", "runId", "createdAt")


def message_id(thread_id: str, created_at: int, message_id: str) -> str:
    """Better Agent's storage id of a message: ``f"{threadId}:{createdAt}:{message['id']}"``."""
    return f"{thread_id}:{created_at}:{message_id}"


def message_mapper(dialect: Dialect) -> Mapper:
    """memoryMessages <-> messages(id, thread_id, run_id, message, created_at).

    The row keeps threadId, runId and createdAt in columns and every other key of the
    record (the AG-UI message: id, role, content, toolCalls, ...) in the `message` JSON.
    """
    T = "memoryMessages"
    ts_in, ts_out, load = dialect.encode_ts, dialect.decode_ts, dialect.load_json
    check_json = make_json_check(dialect)

    def to_row(key: str, value: Any) -> Row:
        r = _record(T, value)
        key = check_key(T, "id", key)
        thread_id = check_key(T, "threadId", _need(T, r, "threadId"))
        created = check_ts(T, "createdAt", _need(T, r, "createdAt"))
        msg_id = check_text(T, "id", _need(T, r, "id"), allow_empty=False)
        check_text(T, "role", _need(T, r, "role"))
        expected = message_id(thread_id, created, msg_id)
        if key != expected:
            raise _fail(T, "id",
                        f"storage id {key!r:.120} does not match threadId:createdAt:id = {expected!r:.120}")
        run_id = r.get("runId")
        body = {k: v for k, v in r.items() if k not in _MESSAGE_COLUMNS}
        try:
            text = check_json(T, "message", body)
        except RecordError:
            for field, item in body.items():  # name the message's own field (content, toolCalls, ...)
                if isinstance(field, str):
                    check_json(T, field, item)
            raise
        return (
            key,
            thread_id,
            None if run_id is None else check_text(T, "runId", run_id),
            text,
            ts_in(created),
        )

    def from_row(row: Row) -> Record:
        id_, thread_id, run_id, message, created = row
        rec: Record = load(message)
        if not isinstance(rec, dict):
            rec = {"content": rec}  # a row someone wrote by hand; keep what is there
        rec["threadId"] = thread_id
        if run_id is not None:
            rec["runId"] = run_id
        rec["createdAt"] = ts_out(created)
        return rec

    return Mapper(to_row, from_row)




def run_mapper(dialect: Dialect) -> Mapper:
    """runs <-> agent_runs(run_id, agent_name, thread_id, scope, status, abort_requested_at,
    final_event, config, started_at, updated_at, finished_at)."""
    T = "runs"
    fields = TABLES[T].fields
    ts_in, ts_out, load = dialect.encode_ts, dialect.decode_ts, dialect.load_json
    check_json = make_json_check(dialect)

    def opt_ts(r: Mapping[str, Any], field: str) -> Any:
        v = r.get(field)
        return None if v is None else ts_in(check_ts(T, field, v))

    def to_row(key: str, value: Any) -> Row:
        r = _record(T, value)
        _no_unknown(T, r, fields)
        key = check_key(T, "runId", key)
        if "runId" in r:
            _same_key(T, "runId", r["runId"], key)
        thread_id = r.get("threadId")
        scope = r.get("scope")
        final = _final_event(r.get("finalEvent"), check_json)
        config = r.get("config")
        return (
            key,
            check_text(T, "agentName", _need(T, r, "agentName")),
            None if thread_id is None else check_text(T, "threadId", thread_id),
            None if scope is None else check_text(T, "scope", scope),
            check_choice(T, "status", _need(T, r, "status"), RUN_STATUSES),
            opt_ts(r, "abortRequestedAt"),
            final,
            None if config is None else check_json(T, "config", config),
            ts_in(check_ts(T, "startedAt", _need(T, r, "startedAt"))),
            ts_in(check_ts(T, "updatedAt", _need(T, r, "updatedAt"))),
            opt_ts(r, "finishedAt"),
        )

    def from_row(row: Row) -> Record:
        (run_id, agent, thread_id, scope, status, abort_at, final, config,
         started, updated, finished) = row
        rec: Record = {"runId": run_id, "agentName": agent}
        if thread_id is not None:
            rec["threadId"] = thread_id
        if scope is not None:
            rec["scope"] = scope
        rec["status"] = status
        if abort_at is not None:
            rec["abortRequestedAt"] = ts_out(abort_at)
        if final is not None:
            rec["finalEvent"] = load(final)
        # always present ("Records" in docs/contract.md)
        rec["config"] = None if config is None else load(config)
        rec["startedAt"] = ts_out(started)
        rec["updatedAt"] = ts_out(updated)
        if finished is not None:
            rec["finishedAt"] = ts_out(finished)
        return rec

    return Mapper(to_row, from_row)




def _final_event(final: Any, check_json: Callable[[str, str, Any], Any]) -> Any:
    """A run's finalEvent checked (a RUN_FINISHED or RUN_ERROR object) and encoded; None stays None."""
    if final is None:
        return None
    if not isinstance(final, dict) or final.get("type") not in FINAL_EVENT_TYPES:
        raise _fail("runs", "finalEvent",
                    f"must be an object whose type is RUN_FINISHED or RUN_ERROR, got {final!r:.80}")
    return check_json("runs", "finalEvent", final)


def stream_mapper(dialect: Dialect) -> Mapper:
    """streams <-> streams(id, run_id, status, created_at, updated_at, closed_at); id = runId."""
    T = "streams"
    fields = TABLES[T].fields
    ts_in, ts_out = dialect.encode_ts, dialect.decode_ts

    def to_row(key: str, value: Any) -> Row:
        r = _record(T, value)
        _no_unknown(T, r, fields)
        key = check_key(T, "id", key)
        if "id" in r:
            _same_key(T, "id", r["id"], key)
        if "runId" in r:
            _same_key(T, "runId", r["runId"], key)
        closed = r.get("closedAt")
        return (
            key,
            key,
            check_choice(T, "status", _need(T, r, "status"), STREAM_STATUSES),
            ts_in(check_ts(T, "createdAt", _need(T, r, "createdAt"))),
            ts_in(check_ts(T, "updatedAt", _need(T, r, "updatedAt"))),
            None if closed is None else ts_in(check_ts(T, "closedAt", closed)),
        )

    def from_row(row: Row) -> Record:
        _id, run_id, status, created, updated, closed = row
        rec: Record = {"runId": run_id, "status": status,
                       "createdAt": ts_out(created), "updatedAt": ts_out(updated)}
        if closed is not None:
            rec["closedAt"] = ts_out(closed)
        return rec

    return Mapper(to_row, from_row)




def check_seq(table: str, value: Any) -> int:
    """A stream event's sequence number: an int from 1 up."""
    if type(value) is not int or not 1 <= value <= MAX_SEQ:
        raise _fail(table, "seq", f"must be an integer from 1 to {MAX_SEQ}, got {value!r:.80}")
    return value


def stream_event_mapper(dialect: Dialect) -> Mapper:
    """streamEvents <-> stream_events(id, run_id, seq, timestamp, event); id = f"{runId}:{seq}"."""
    T = "streamEvents"
    fields = TABLES[T].fields
    ts_in, ts_out, load = dialect.encode_ts, dialect.decode_ts, dialect.load_json
    check_json = make_json_check(dialect)

    def to_row(key: str, value: Any) -> Row:
        r = _record(T, value)
        _no_unknown(T, r, fields)
        key = check_key(T, "id", key)
        if "id" in r:
            _same_key(T, "id", r["id"], key)
        run_id = check_key(T, "runId", _need(T, r, "runId"))
        seq = check_seq(T, _need(T, r, "seq"))
        if key != f"{run_id}:{seq}":
            raise _fail(T, "id", f"{key!r:.120} must be runId:seq = {run_id}:{seq}")
        event = _need(T, r, "event")
        if not isinstance(event, dict):
            raise _fail(T, "event", f"must be an event object (dict), got {type(event).__name__}")
        return (key, run_id, seq, ts_in(check_ts(T, "timestamp", _need(T, r, "timestamp"))),
                check_json(T, "event", event))

    def from_row(row: Row) -> Record:
        id_, run_id, seq, stamp, event = row
        return {"id": id_, "runId": run_id, "seq": seq, "timestamp": ts_out(stamp), "event": load(event)}

    return Mapper(to_row, from_row)


#: Each logical table's mapper pair; everything else about the table comes from its model.
_MAPPERS: Mapping[str, Callable[[Dialect], Mapper]] = {
    "memoryThreads": thread_mapper,
    "memoryMessages": message_mapper,
    "runs": run_mapper,
    "streams": stream_mapper,
    "streamEvents": stream_event_mapper,
}


def _spec(model: Any) -> TableSpec:
    name = logical_name(model)
    key = key_column(model)
    queryable = {f: QueryField(f, column, kind) for f, (column, kind) in queryable_columns(model).items()}
    key_field = next((f for f, q in queryable.items() if q.column == key), "id")
    return TableSpec(name, model._meta.table_name, key_field, key, row_columns(model), json_columns(model),
                     queryable, frozenset(record_fields(model)), _MAPPERS[name])


#: logical table name -> its spec, in creation order, derived from the models' declaration.
TABLES: Mapping[str, TableSpec] = {spec.name: spec
                                   for spec in map(_spec, REFERENCE_MODELS.in_dependency_order())}
