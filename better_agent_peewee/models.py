"""The five tables of CONTRACT section 3 as Peewee models, built per database.

Each call to `build_models` makes fresh model classes bound to one database, with the
column types its dialect chose: one process can hold a SQLite and a PostgreSQL storage
at once without the two sharing (and fighting over) one set of field objects.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Type

import peewee

from .dialects import Dialect


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
        id = d.key(primary_key=True)
        agent_name = d.key(null=True)
        scope = d.key(null=True)
        title = d.text(null=True)
        state = d.json(null=True)
        metadata = d.json(null=True)
        created_at = d.timestamp(default_now=True)
        updated_at = d.timestamp(default_now=True)

        class Meta:
            table_name = "threads"

    class Message(Base):
        id = d.key(primary_key=True)
        thread = peewee.ForeignKeyField(Thread, field=Thread.id, column_name="thread_id", index=False)
        run_id = d.key(null=True)
        message = d.json()
        created_at = d.timestamp(default_now=True)

        class Meta:
            table_name = "messages"

    class Run(Base):
        run_id = run_id_column
        agent_name = d.key()
        thread_id = d.key(null=True)
        scope = d.key(null=True)
        status = d.key()
        abort_requested_at = d.timestamp(null=True)
        final_event = d.json(null=True)
        config = d.json(null=True)
        started_at = d.timestamp(default_now=True)
        updated_at = d.timestamp(default_now=True)
        finished_at = d.timestamp(null=True)

        class Meta:
            table_name = "agent_runs"
            if not run_primary_key:
                primary_key = False

    class Stream(Base):
        id = d.key(primary_key=True)
        run_id = d.key(constraints=[peewee.SQL("UNIQUE")])
        status = d.key()
        created_at = d.timestamp(default_now=True)
        updated_at = d.timestamp(default_now=True)
        closed_at = d.timestamp(null=True)

        class Meta:
            table_name = "streams"

    class StreamEvent(Base):
        id = d.key(primary_key=True)
        run_id = d.key()
        seq = d.integer()
        timestamp = d.timestamp(default_now=True)
        event = d.json()

        class Meta:
            table_name = "stream_events"

    # Index names are part of the shared schema (CONTRACT 3): name them, never let Peewee.
    Thread.add_index(Thread.agent_name, Thread.scope, name="threads_agent_name_scope_idx")
    Message.add_index(Message.thread, name="messages_thread_id_idx")
    Run.add_index(Run.run_id, Run.scope, name="agent_runs_run_id_scope_idx")
    StreamEvent.add_index(StreamEvent.run_id, name="stream_events_run_id_idx")
    StreamEvent.add_index(StreamEvent.run_id, StreamEvent.seq, unique=True,
                          name="stream_events_run_id_seq_unique")

    return Models(Thread, Message, Run, Stream, StreamEvent)
