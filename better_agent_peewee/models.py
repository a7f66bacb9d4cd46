"""The five tables, each declared once: Peewee models built per database, and what follows from them.

The model classes below are the single declaration of every table: its physical and
logical name, its columns in row order (the order the mappers in `records` read and
write), which record field each column stores (`stores`), its key, its JSON columns and
its indexes with their shared names. Everything else is derived from them by the
functions at the end of this module: the mappers' column order, the fields `list` may
filter on, `check_schema`'s expectations and the command line's table list
("Physical schema" in docs/contract.md; "Adding a field" in docs/architecture.md).

Each call to `build_models` makes fresh model classes bound to one database, with the
column types its dialect chose: one process can hold a SQLite and a PostgreSQL storage
at once without the two sharing (and fighting over) one set of field objects.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Type, TypeVar

import peewee

from .dialects import Dialect, JSONField, TimestampField

__all__ = ["Models", "build_models", "REFERENCE_MODELS", "PHYSICAL_TABLES", "IndexSpec", "stores",
           "logical_name", "row_columns", "key_column", "json_columns", "record_fields", "queryable_columns",
           "expected_indexes", "primary_key_columns", "foreign_keys", "PERFORMANCE_PREFIX",
           "PERFORMANCE_INDEXES", "is_performance_index"]

FieldT = TypeVar("FieldT", bound=peewee.Field)


def stores(record_field: str, column: FieldT) -> FieldT:
    """Declare that `column` holds the record field `record_field` (camelCase, as Better Agent names it)."""
    column.record_field = record_field  # type: ignore[attr-defined]
    return column


class Models(NamedTuple):
    """The model classes of one database, one per physical table.

    Typed `Any`: the classes are built per database, so a type checker cannot see their
    fields (``models.run.status``); each is a `peewee.Model` subclass.
    """

    thread: Any
    message: Any
    run: Any
    stream: Any
    stream_event: Any

    def in_dependency_order(self) -> List[Type[peewee.Model]]:
        """Creation order (threads before messages, which reference them)."""
        return [self.thread, self.message, self.run, self.stream, self.stream_event]


def build_models(database: peewee.Database, dialect: Dialect, run_primary_key: bool = False) -> Models:
    """Model classes for the five tables, bound to `database`, with `dialect`'s column types.

    `run_primary_key` makes agent_runs.run_id its primary key instead of a UNIQUE column (same
    column, same uniqueness), for servers that refuse tables without a primary key.
    """
    d = dialect
    run_id_column = d.key(primary_key=True) if run_primary_key else d.key(constraints=[peewee.SQL("UNIQUE")])

    class Base(peewee.Model):
        class Meta:
            legacy_table_names = False
            table_settings = list(d.table_settings)

    Base._meta.set_database(database)

    class Thread(Base):
        id = stores("id", d.key(primary_key=True))
        agent_name = stores("agentName", d.key(null=True))
        scope = stores("scope", d.key(null=True))
        title = stores("title", d.text(null=True))
        state = stores("state", d.json(null=True))
        metadata = stores("metadata", d.json(null=True))
        created_at = stores("createdAt", d.timestamp(default_now=True))
        updated_at = stores("updatedAt", d.timestamp(default_now=True))

        class Meta:
            table_name = "threads"
            logical_name = "memoryThreads"

    class Message(Base):
        # The key is Better Agent's storage id (threadId:createdAt:id), not a record field;
        # the message itself (id, role, content, ...) lives in the `message` JSON column.
        id = d.key(primary_key=True)
        thread = stores("threadId", peewee.ForeignKeyField(Thread, field=Thread.id, column_name="thread_id",
                                                            index=False))
        run_id = stores("runId", d.key(null=True))
        message = d.json()
        created_at = stores("createdAt", d.timestamp(default_now=True))

        class Meta:
            table_name = "messages"
            logical_name = "memoryMessages"

    class Run(Base):
        run_id = stores("runId", run_id_column)
        agent_name = stores("agentName", d.key())
        thread_id = stores("threadId", d.key(null=True))
        scope = stores("scope", d.key(null=True))
        status = stores("status", d.key())
        abort_requested_at = stores("abortRequestedAt", d.timestamp(null=True))
        final_event = stores("finalEvent", d.json(null=True))
        config = stores("config", d.json(null=True))
        started_at = stores("startedAt", d.timestamp(default_now=True))
        updated_at = stores("updatedAt", d.timestamp(default_now=True))
        finished_at = stores("finishedAt", d.timestamp(null=True))

        class Meta:
            table_name = "agent_runs"
            logical_name = "runs"
            if not run_primary_key:
                primary_key = False  # as the TypeScript adapters create it: run_id is UNIQUE instead
            key = "run_id"

    class Stream(Base):
        id = stores("id", d.key(primary_key=True))
        run_id = stores("runId", d.key(constraints=[peewee.SQL("UNIQUE")]))
        status = stores("status", d.key())
        created_at = stores("createdAt", d.timestamp(default_now=True))
        updated_at = stores("updatedAt", d.timestamp(default_now=True))
        closed_at = stores("closedAt", d.timestamp(null=True))

        class Meta:
            table_name = "streams"
            logical_name = "streams"

    class StreamEvent(Base):
        id = stores("id", d.key(primary_key=True))
        run_id = stores("runId", d.key())
        seq = stores("seq", d.integer())
        timestamp = stores("timestamp", d.timestamp(default_now=True))
        event = stores("event", d.json())

        class Meta:
            table_name = "stream_events"
            logical_name = "streamEvents"

    # Index names are part of the shared schema ("Physical schema" in docs/contract.md): name
    # them, never let Peewee.
    Thread.add_index(Thread.agent_name, Thread.scope, name="threads_agent_name_scope_idx")
    Message.add_index(Message.thread, name="messages_thread_id_idx")
    Run.add_index(Run.run_id, Run.scope, name="agent_runs_run_id_scope_idx")
    StreamEvent.add_index(StreamEvent.run_id, name="stream_events_run_id_idx")
    StreamEvent.add_index(StreamEvent.run_id, StreamEvent.seq, unique=True,
                          name="stream_events_run_id_seq_unique")

    # Ours, not the shared schema's: performance indexes, named with PERFORMANCE_PREFIX so they
    # never collide with a shared name. Each serves lookups the package makes on every run
    # (PERFORMANCE_INDEXES says which; docs/performance.md has the EXPLAIN and the write cost).
    # A database without them works, slower: check_schema reports them as advice.
    Thread.add_index(Thread.agent_name, Thread.updated_at, name="bap_threads_agent_updated_idx")
    Thread.add_index(Thread.updated_at, Thread.id, name="bap_threads_updated_idx")
    Thread.add_index(Thread.agent_name, Thread.id, name="bap_threads_agent_id_idx")
    Message.add_index(Message.thread, Message.created_at, Message.id, name="bap_messages_thread_created_idx")
    Message.add_index(Message.run_id, Message.created_at, Message.id, name="bap_messages_run_idx")
    Run.add_index(Run.thread_id, Run.started_at, name="bap_agent_runs_thread_started_idx")
    Run.add_index(Run.agent_name, Run.status, Run.started_at, name="bap_agent_runs_agent_status_started_idx")
    Run.add_index(Run.status, Run.finished_at, name="bap_agent_runs_status_finished_idx")

    return Models(Thread, Message, Run, Stream, StreamEvent)


#: Prefix of our own (performance) index names: no index of the shared schema has it.
PERFORMANCE_PREFIX = "bap_"
#: Our performance indexes, by name: the statements each one serves.
PERFORMANCE_INDEXES: Dict[str, str] = {
    "bap_threads_agent_updated_idx": "memory.threads.list(agent_name=...): newest updatedAt first",
    "bap_threads_updated_idx": "memory.prune_threads: threads idle since a cutoff, oldest first",
    "bap_threads_agent_id_idx": "the inspector's thread search: an agent's threads whose id starts "
                                "with a prefix",
    "bap_messages_thread_created_idx": "memory.messages.list(thread, limit, before_run_id): createdAt, id",
    "bap_messages_run_idx": "memory.messages.list(before_run_id=...): the first message of that run "
                            "(createdAt, then id)",
    "bap_agent_runs_thread_started_idx": "runs.latest_for_thread: where threadId, orderBy startedAt desc",
    "bap_agent_runs_agent_status_started_idx": "runs.running(agent, scope): where agentName, status running, "
                                               "orderBy startedAt desc",
    "bap_agent_runs_status_finished_idx": "runs.prune (status, finishedAt < cutoff) and reap_stale "
                                          "(status running)",
}


def is_performance_index(index: IndexSpec) -> bool:
    """True for our own performance indexes, False for the shared schema's."""
    return index.name is not None and index.name.startswith(PERFORMANCE_PREFIX)


# -- what follows from the declaration ----------------------------------------------------------

def logical_name(model: Type[peewee.Model]) -> str:
    """The table's name in Better Agent's storage interface (``memoryThreads``, ``runs``, ...)."""
    meta: Any = model._meta  # a Meta option of ours: peewee keeps it, its stubs do not know it
    name: str = meta.logical_name
    return name


def row_columns(model: Type[peewee.Model]) -> Tuple[str, ...]:
    """The table's columns in declaration order: the order of a mapper's row tuple."""
    return tuple(f.column_name for f in model._meta.sorted_fields)


def key_column(model: Type[peewee.Model]) -> str:
    """The column a record is stored under: the primary key, or the `key` named in Meta."""
    named: Optional[str] = getattr(model._meta, "key", None)
    if named is not None:
        return named
    primary: Any = model._meta.primary_key
    column: str = primary.column_name
    return column


def json_columns(model: Type[peewee.Model]) -> Tuple[str, ...]:
    """The JSON columns (never filtered on: `list` refuses them)."""
    return tuple(f.column_name for f in model._meta.sorted_fields if isinstance(f, JSONField))


def record_fields(model: Type[peewee.Model]) -> Tuple[str, ...]:
    """The record fields stored in columns of their own, in column order."""
    return tuple(f.record_field for f in model._meta.sorted_fields if hasattr(f, "record_field"))


def queryable_columns(model: Type[peewee.Model]) -> Dict[str, Tuple[str, str]]:
    """record field -> (column, kind) for the fields `list` may filter and order on: every
    field with a column of its own except JSON; kind is "text", "int" or "ts"."""
    found: Dict[str, Tuple[str, str]] = {}
    for f in model._meta.sorted_fields:
        if not hasattr(f, "record_field") or isinstance(f, JSONField):
            continue
        kind = "ts" if isinstance(f, TimestampField) else \
            "int" if isinstance(f, peewee.IntegerField) else "text"
        found[f.record_field] = (f.column_name, kind)
    return found


class IndexSpec(NamedTuple):
    """An index `check_schema` expects. `name` None: a UNIQUE column constraint, any unique
    index on the column serves."""

    table: str
    name: Optional[str]
    columns: Tuple[str, ...]
    unique: bool


def expected_indexes(model: Type[peewee.Model]) -> List[IndexSpec]:
    """The UNIQUE column constraints and the named indexes of the table, as declared."""
    table = model._meta.table_name
    found = [IndexSpec(table, None, (f.column_name,), True) for f in model._meta.sorted_fields
             if any(isinstance(c, peewee.SQL) and c.sql.upper() == "UNIQUE" for c in (f.constraints or ()))]
    for index in model._meta.indexes:
        columns = tuple(e.column_name for e in index._expressions)
        found.append(IndexSpec(table, index._name, columns, bool(index._unique)))
    return found


def primary_key_columns(model: Type[peewee.Model]) -> List[str]:
    """The primary key's columns (none for agent_runs, unless built with `run_primary_key`)."""
    primary = model._meta.primary_key
    if not primary:
        return []
    if isinstance(primary, peewee.CompositeKey):
        return [model._meta.fields[name].column_name for name in primary.field_names]
    return [primary.column_name]


def foreign_keys(model: Type[peewee.Model]) -> List[Tuple[str, str, str]]:
    """(column, referenced table, referenced column) of each foreign key."""
    return [(f.column_name, f.rel_model._meta.table_name, f.rel_field.column_name)
            for f in model._meta.sorted_fields if isinstance(f, peewee.ForeignKeyField)]


#: The models on no database in particular, for what does not depend on one (names, columns).
REFERENCE_MODELS = build_models(peewee.Database(None), Dialect(peewee.Database(None)))
#: The physical tables in creation order, as `create_tables` builds them.
PHYSICAL_TABLES: Tuple[str, ...] = tuple(m._meta.table_name for m in REFERENCE_MODELS.in_dependency_order())
