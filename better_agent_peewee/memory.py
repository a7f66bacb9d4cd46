"""Conversation memory: threads and their messages, as Better Agent's memory flows use them.

`storage.memory.threads` and `storage.memory.messages` mirror Better Agent's
`memory.threads` / `memory.messages`, and `storage.memory.fork` its `memory.fork`
("Memory" in docs/contract.md). What Better Agent does with several independent writes is done here in
one transaction each, so a failure part-way leaves nothing half done: deleting a
thread (its messages, then the thread), appending a batch of messages, and forking.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import peewee

from .checks import is_int
from .errors import ConflictError, ConnectionLostError, NotFoundError, RecordError
from .executor import Applied, json_refused, read_back_after
from .query import MultiRowInsert, compile_statement, first_row, marker, select_columns
from .records import check_key, check_ts, make_json_check, message_id, now_ms, storable_key
from .retention import ThreadPruneReport, prune_threads
from .tables import TableAdapter, Tables

logger = logging.getLogger(__name__)

__all__ = ["Memory", "Threads", "Messages"]

_THREADS = "memoryThreads"
_MESSAGES = "memoryMessages"
#: Keys of a message record that come from where it is stored, not from the message itself.
_PLACEMENT = ("threadId", "runId", "createdAt")

Record = Dict[str, Any]


def _check_limit(limit: Any) -> Optional[int]:
    if limit is not None and (not is_int(limit) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative integer, got {limit!r:.80}")
    return cast(Optional[int], limit)


class Threads:
    """`storage.memory.threads`: get, list, set and delete conversation threads."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._db: peewee.Database = tables.executor.database
        self._table: TableAdapter = tables.table(_THREADS)
        T, M = tables.models.thread, tables.models.message
        self._delete_messages = compile_statement(self._db, M.delete().where(M.thread == marker("thread")))
        self._delete_thread = compile_statement(self._db, T.delete().where(T.id == marker("thread")))
        self._touch = compile_statement(self._db, T.update({T.updated_at: marker("now")}).where(
            T.id == marker("thread")))
        self._encode_ts = tables.executor.dialect.encode_ts
        self._check_json = make_json_check(tables.executor.dialect)
        # A run's state write: the state and updatedAt only (a concurrent title or metadata change
        # is kept), and, for a run that must still be running, only while it is (one statement).
        R = tables.models.run
        write = T.update({T.state: marker("state"), T.updated_at: marker("now")})
        self._set_state = compile_statement(self._db, write.where(T.id == marker("thread")))
        running = R.select(peewee.SQL("1")).where((R.run_id == marker("run")) & (R.status == "running"))
        self._set_state_running = compile_statement(self._db, write.where(
            (T.id == marker("thread")) & peewee.fn.EXISTS(running)))
        self._running = compile_statement(self._db, running)
        # A new thread, stored only if no thread has the id (the primary key decides a race), and
        # the thread read under a share lock: the latest committed version, even inside a
        # REPEATABLE READ transaction whose snapshot predates it (MySQL's default).
        spec, dialect = self._table.spec, tables.executor.dialect
        fields = {f.column_name: f for f in T._meta.sorted_fields}
        self._create = compile_statement(self._db, dialect.skip_duplicates(
            T.insert({fields[c]: marker(c) for c in spec.columns})))
        if self._create.names != spec.columns:
            raise AssertionError(f"thread insert parameters out of column order: {self._create.plan}")
        latest = T.select(*select_columns(T, spec, dialect)).where(T.id == marker("thread"))
        if dialect.row_share_lock is not None:
            latest = latest.for_update(dialect.row_share_lock)
        self._latest = compile_statement(self._db, latest)

    def get(self, thread_id: str) -> Optional[Record]:
        """The thread record `thread_id`, or None."""
        return self._table.get(thread_id)

    def list(self, agent_name: Optional[str] = None, scope: Optional[str] = None,
             limit: Optional[int] = None) -> List[Record]:
        """Threads, most recently updated first.

        :param agent_name: only this agent's threads (None: every agent's).
        :param scope: only threads in this scope (None: any scope).
        :param limit: at most this many (applied in SQL).
        """
        where: Dict[str, Any] = {}
        if agent_name is not None:
            where["agentName"] = agent_name
        if scope is not None:
            where["scope"] = scope
        query: Dict[str, Any] = {"where": where, "orderBy": {"updatedAt": "desc"}}
        if _check_limit(limit) is not None:
            query["take"] = limit
        return self._table.list(query)["items"]

    def set(self, thread_id: str, thread: Mapping[str, Any]) -> None:
        """Create or replace the thread `thread_id`; a record whose `id` differs is refused."""
        self._table.set(thread_id, thread)

    def create(self, thread_id: str, thread: Mapping[str, Any]) -> Optional[Record]:
        """Store the new thread `thread_id` unless a thread has that id: None when this call
        stored it, else the thread that exists (which is left as it is).

        One INSERT that never overwrites: of callers racing to create one id, exactly one stores
        its record, and the others get the winner's (once it is committed: read under a share
        lock, so also inside a transaction that began before it).

        :raises RecordError: a field cannot be stored (nothing is written).
        :raises ConflictError: the thread that stopped the insert was deleted before it could be read.
        """
        row = self._table.to_row(thread_id, thread)  # validates: bad input raises before any write
        try:
            # After a lost reply the thread is read back: ours (createdAt, agentName, scope) means stored.
            stored = self._executor.execute(self._create.sql, row, idempotent=False,
                                            resolve=lambda: self._created(thread_id, thread)).rowcount == 1
        except peewee.IntegrityError as exc:  # MySQL: the duplicate raises instead of being skipped
            if self._executor.dialect.is_foreign_key_violation(exc):
                raise
            stored = False
        if stored:
            return None
        params = self._latest.params({"thread": thread_id})
        rows = self._executor.execute(self._latest.sql, params, idempotent=True).fetchall()
        if not rows:  # created and deleted again meanwhile: stored by neither
            raise ConflictError(f"{_THREADS}: thread {thread_id!r} was created and deleted by someone else "
                                "meanwhile; nothing was written")
        existing: Record = self._table.from_row(rows[0])
        return existing

    def _created(self, thread_id: str, thread: Mapping[str, Any]) -> Optional[Applied]:
        """After a lost reply: Applied(1) when the stored thread is ours, None when there is none
        (the INSERT runs again), else Applied(0)."""
        stored = self.get(thread_id)
        if stored is None:
            return None
        return Applied(int(all(stored.get(k) == thread.get(k) for k in ("createdAt", "agentName", "scope"))))

    def touch(self, thread_id: str, updated_at: int) -> None:
        """Set the thread's `updatedAt` (and nothing else), as a run that starts or ends does.

        One UPDATE, so a concurrent change of the thread's title or state is kept. A thread
        that does not exist is left so.
        """
        if not storable_key(thread_id):
            return
        params = self._touch.params({"now": self._encode_ts(check_ts(_THREADS, "updatedAt", updated_at)),
                                     "thread": thread_id})
        self._executor.execute(self._touch.sql, params, idempotent=True)

    def check_state(self, state: Any) -> Optional[str]:
        """`state` encoded for its column (None for no state); RecordError naming `state` when it
        is not JSON (or not storable on every dialect)."""
        return None if state is None else self._check_json(_THREADS, "state", state)

    def set_state(self, thread_id: str, state: Any, updated_at: int, *,
                  while_running: Optional[str] = None) -> bool:
        """Set the thread's `state` and `updatedAt` (nothing else), as a run's ``onState`` does;
        True if the thread was written.

        One UPDATE, so a concurrent change of the thread's title or metadata is kept. With
        `while_running` (a run id), only while that run is `running`: False when it is not, or
        when there is no such thread.

        :raises RecordError: `state` is not JSON (nothing is written).
        """
        thread_id = check_key(_THREADS, "id", thread_id)
        values = {"state": self.check_state(state), "thread": thread_id,
                  "now": self._encode_ts(check_ts(_THREADS, "updatedAt", updated_at)), "run": while_running}
        statement = self._set_state if while_running is None else self._set_state_running
        if self._executor.execute(statement.sql, statement.params(values), idempotent=True).rowcount == 1:
            return True
        # MySQL counts a row whose values did not change as not updated: look.
        if while_running is not None and first_row(self._executor.execute(
                self._running.sql, self._running.params({"run": while_running}), idempotent=True)) is None:
            return False
        thread = self.get(thread_id)
        return thread is not None and thread["updatedAt"] == updated_at and thread.get("state") == state

    def delete(self, thread_id: str) -> None:
        """Delete the thread `thread_id` and its messages, in one transaction.

        Deleting a thread that does not exist does nothing. If the thread cannot be deleted
        (say another table of yours references it), its messages are kept too.
        """
        if not storable_key(thread_id):  # no thread can have this id
            return
        params = [thread_id]
        try:
            with self._executor.transaction():
                self._executor.execute(self._delete_messages.sql, params, idempotent=True)
                self._executor.execute(self._delete_thread.sql, params, idempotent=True)
        except peewee.IntegrityError as exc:
            raise ConflictError(f"{_THREADS}: thread {thread_id!r} cannot be deleted "
                                f"(nothing was deleted): {exc}") from exc
        logger.debug("deleted thread %r", thread_id)


class Messages:
    """`storage.memory.messages`: append to and list the messages of a thread."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._db: peewee.Database = tables.executor.database
        self._dialect = tables.executor.dialect
        self._table: TableAdapter = tables.table(_MESSAGES)
        self._to_row = self._table.to_row
        self._from_row = self._table.from_row
        M = tables.models.message
        self._model = M
        self._rows = MultiRowInsert(self._db, M, M._meta.sorted_fields)  # the mapper's row order
        self._id_index = list(self._table.spec.columns).index("id")
        self._exists = compile_statement(self._db, M.select(M.id).where(M.id == marker("id")))
        # Appends "while the run is running": the run's row read under a share lock (SQLite's
        # write lock is the whole database's), so they commit before anyone can end the run. One
        # message is one INSERT ... SELECT from the run's row (nothing when it is not running);
        # a batch reads the status, then inserts, in one transaction.
        R, lock = tables.models.run, self._dialect.row_share_lock
        running = (R.run_id == marker("run")) & (R.status == "running")
        columns = [f.column_name for f in M._meta.sorted_fields]
        json_columns = self._table.spec.json_columns
        one = R.select(*[self._dialect.json_param(marker(c)) if c in json_columns else marker(c)
                         for c in columns]).where(running)
        status = R.select(R.status).where(R.run_id == marker("run"))
        if lock is not None:
            one, status = one.for_update(lock), status.for_update(lock)
        self._one_while_running = compile_statement(self._db, M.insert_from(one, M._meta.sorted_fields))
        self._run_status = compile_statement(self._db, status)
        self._columns = columns

        # The first message of a run in the listing order (createdAt, then id).
        self._first_of_run = compile_statement(self._db, M.select(M.created_at, M.id).where(
            (M.thread == marker("thread")) & (M.run_id == marker("run"))
        ).order_by(M.created_at, M.id).limit(1))
        # Four listing shapes: with or without a limit, with or without a cut-off message.
        columns = select_columns(M, self._table.spec, self._dialect)
        before = (M.created_at < marker("at")) | ((M.created_at == marker("at2")) & (M.id < marker("id")))
        self._list: Dict[Any, Any] = {}
        for has_before in (False, True):
            cond = M.thread == marker("thread")
            if has_before:
                cond &= before
            base = M.select(*columns).where(cond)
            self._list[has_before, False] = compile_statement(self._db, base.order_by(M.created_at, M.id))
            # The last N are the first N newest-first, reversed in Python: only N rows are read.
            self._list[has_before, True] = compile_statement(
                self._db, base.order_by(M.created_at.desc(), M.id.desc()).limit(marker("limit")))
        # thread id -> the last createdAt this process gave a message of it (see append).
        self._last_created: Dict[str, int] = {}
        self._created_at_lock = threading.Lock()  # guards _last_created

    def list(self, thread_id: str, limit: Optional[int] = None,
             before_run_id: Optional[str] = None) -> List[Record]:
        """The messages of `thread_id` in chronological (`createdAt`) order.

        :param limit: keep only the last `limit` messages (done in SQL: only those are read).
        :param before_run_id: keep only the messages before the first message of that run
            (all of them when the run has no message in the thread); applied before `limit`.
        """
        _check_limit(limit)
        if not storable_key(thread_id):  # no thread can have this id
            return []
        values: Dict[str, Any] = {"thread": thread_id, "limit": limit}
        cut = False
        if before_run_id is not None:
            if not isinstance(before_run_id, str):
                raise ValueError(f"before_run_id must be a string, got {type(before_run_id).__name__}")
            first = first_row(self._executor.execute(self._first_of_run.sql, self._first_of_run.params(
                {"thread": thread_id, "run": before_run_id}), idempotent=True))
            if first is not None:
                cut = True
                values.update(at=first[0], at2=first[0], id=first[1])
        statement = self._list[cut, limit is not None]
        rows = self._executor.execute(statement.sql, statement.params(values), idempotent=True).fetchall()
        from_row = self._from_row
        if limit is not None:
            return [from_row(row) for row in reversed(rows)]
        return [from_row(row) for row in rows]

    def append(self, thread_id: str, messages: Sequence[Mapping[str, Any]],
               run_id: Optional[str] = None, *, while_running: Optional[str] = None) -> List[Record]:
        """Append `messages` to the thread `thread_id`, all or nothing; return the records.

        Message i gets ``createdAt = now + i`` and the record id
        ``f"{threadId}:{createdAt}:{message['id']}"``, as Better Agent writes them (`now` is
        moved on past the last message this process appended to the thread, so that quick
        successive appends keep their order); a message without an `id` gets a new one.
        `run_id` is recorded as each message's `runId`. With `while_running` (a run id), only
        while that run is `running`, checked by the INSERT itself (one message) or in the
        append's transaction (a batch), the run's row locked: a run ended meanwhile (failed by
        `reap_stale`, finished elsewhere) gets none.

        :raises ConflictError: the run `while_running` is not running, or a message id is
            already stored (nothing is written).
        :raises NotFoundError: the thread does not exist (nothing is written).
        :raises RecordError: a message cannot be stored (nothing is written).
        """
        thread_id = check_key(_MESSAGES, "threadId", thread_id)
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise RecordError(_MESSAGES, None, f"messages must be a list of message dicts, "
                                               f"got {type(messages).__name__}")
        if not messages:
            return []
        with self._created_at_lock:
            # now + i as Better Agent writes, but never before what this process last gave the
            # thread: two appends within a few ms would otherwise interleave in createdAt order.
            now = max(now_ms(), self._last_created.get(thread_id, -1) + 1)
            if len(self._last_created) >= 10_000:
                self._last_created.clear()
            self._last_created[thread_id] = now + len(messages) - 1
        records: List[Record] = []
        rows: List[Tuple[Any, ...]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise RecordError(_MESSAGES, f"messages[{i}]",
                                  f"must be a message dict, got {type(message).__name__}")
            record = {k: v for k, v in message.items() if k not in _PLACEMENT}
            if record.get("id") is None:
                record["id"] = str(uuid.uuid4())
            record["threadId"] = thread_id
            if run_id is not None:
                record["runId"] = run_id
            record["createdAt"] = now + i
            if not isinstance(record["id"], str):
                raise RecordError(_MESSAGES, f"messages[{i}].id",
                                  f"must be a string, got {type(record['id']).__name__}: "
                                  f"{record['id']!r:.80}")
            try:  # validates completely: a bad message raises before anything is written
                rows.append(self._to_row(message_id(thread_id, now + i, record["id"]), record))
            except RecordError as exc:
                field = f"messages[{i}]" + (f".{exc.field}" if exc.field else "")
                raise RecordError(_MESSAGES, field, exc.reason) from None
            records.append(record)
        self._insert(thread_id, rows, while_running)
        return records

    def _insert(self, thread_id: str, rows: List[Tuple[Any, ...]], while_running: Optional[str]) -> None:
        """Store validated rows all or nothing: one multi-row INSERT, or several in one transaction.

        The foreign key to the thread is the existence check: a missing thread fails the
        first INSERT, which rolls everything back.
        """
        chunks = list(MultiRowInsert.chunks(rows, sized_by=3))  # 3: the message JSON
        first_id = rows[0][self._id_index]
        try:
            if len(chunks) == 1 and while_running is None:  # one statement is atomic: no BEGIN/COMMIT
                # After a lost reply the first message's id (a key) tells whether it was applied.
                self._executor.execute(self._rows.sql(chunks[0][0]), chunks[0][1], idempotent=False,
                                       resolve=lambda: self._read_back(first_id, len(rows)))
            elif len(rows) == 1 and while_running is not None:
                self._insert_one_while_running(rows[0], while_running)
            else:
                self._insert_chunks(chunks, first_id, len(rows), while_running)
        except peewee.IntegrityError as exc:
            if self._dialect.is_foreign_key_violation(exc):
                raise NotFoundError(_THREADS, thread_id,
                                    f"{_MESSAGES}: thread {thread_id!r} does not exist; "
                                    "create it first (storage.memory.threads.set)") from exc
            raise ConflictError(f"{_MESSAGES}: a message of this batch is already stored under its id "
                                f"(nothing was written): {exc}") from exc
        except peewee.OperationalError as exc:
            if self._dialect.rejected_json_column(exc) is None:
                raise
            raise json_refused(_MESSAGES, "message", exc) from exc

    def _insert_chunks(self, chunks: List[Tuple[int, List[Any]]], first_id: str, total: int,
                       while_running: Optional[str] = None) -> None:
        """INSERTs in one transaction (after checking that the run `while_running` runs, when
        given); a connection lost on the way is settled by reading back the first message (outside
        a caller's transaction) and the batch stored again if absent."""
        lost_since: Optional[float] = None
        while True:
            outermost = not self._db.in_transaction()
            try:
                with self._executor.transaction():
                    if while_running is not None:
                        self._require_running(while_running)
                    for count, params in chunks:
                        self._executor.execute(self._rows.sql(count), params, idempotent=True)
                return
            except ConnectionLostError as exc:
                now = time.monotonic()
                lost_since = lost_since or now
                if not outermost or now - lost_since > self._executor.reconnect_window:
                    raise
                if exc.maybe_applied and read_back_after(
                        exc, lambda: self._read_back(first_id, total)) is not None:
                    return
                # Wait (with the reconnect backoff) for the server before trying again: BEGIN on a
                # server that is down fails at once, and trying again at once would spin.
                self._executor.connection()

    def _insert_one_while_running(self, row: Tuple[Any, ...], run_id: str) -> None:
        """One message, stored by one INSERT ... SELECT from the run's row only while it runs."""
        statement = self._one_while_running
        params = statement.params({**dict(zip(self._columns, row)), "run": run_id})
        # After a lost reply the message's id (a key) tells whether it was applied.
        if self._executor.execute(statement.sql, params, idempotent=False, resolve=lambda: self._read_back(
                row[self._id_index], 1)).rowcount != 1:
            self._require_running(run_id)  # raises: the run does not run (or it did not a moment ago)
            raise ConflictError(f"{_MESSAGES}: run {run_id!r} was not running a moment ago; "
                                "nothing was appended")

    def _require_running(self, run_id: str) -> None:
        """ConflictError unless the run `run_id` is running; in a transaction its row stays locked
        until COMMIT."""
        row = first_row(self._executor.execute(self._run_status.sql, self._run_status.params({"run": run_id}),
                                               idempotent=True))
        if row is None or row[0] != "running":
            raise ConflictError(f"{_MESSAGES}: run {run_id!r} is not running "
                                f"({'deleted' if row is None else row[0]}); nothing was appended")

    def _read_back(self, first_id: str, count: int) -> Optional[Applied]:
        params = self._exists.params({"id": first_id})
        row = first_row(self._executor.execute(self._exists.sql, params, idempotent=True))
        return None if row is None else Applied(count)


class Memory:
    """`storage.memory`: threads, messages and fork, as Better Agent's memory uses them."""

    def __init__(self, tables: Tables) -> None:
        self._executor = tables.executor
        self._tables = tables
        self.threads = Threads(tables)
        self.messages = Messages(tables)

    def prune_threads(self, idle_for: datetime.timedelta, *, agent_name: Optional[str] = None,
                      batch_size: int = 1000, dry_run: bool = False, **options: Any) -> ThreadPruneReport:
        """Delete the threads not updated for `idle_for` (a positive `timedelta`), with their
        messages, never one with a running run; what was deleted (or, with `dry_run`, counted).

        :param agent_name: only this agent's threads (None: every agent's).
        :param batch_size: threads per transaction: a kill part-way leaves each thread whole or
            gone, and running it again finishes the job.
        Options (``now_ms``, ``progress``) as `better_agent_peewee.retention.prune_threads`.
        """
        return prune_threads(self._tables, idle_for, agent_name=agent_name, batch_size=batch_size,
                             dry_run=dry_run, **options)

    def fork(self, new_thread_id: str, from_thread_id: str,
             transform: Optional[Callable[[List[Record]], Sequence[Mapping[str, Any]]]] = None) -> Record:
        """Copy the thread `from_thread_id` and its messages to `new_thread_id`; return the new thread.

        The copy gets new `createdAt`/`updatedAt` (now) and its messages are appended anew
        (new `createdAt`, no `runId`), as Better Agent's fork does. `transform`, when given,
        receives the list of messages (without threadId/runId/createdAt) and returns the
        list to append. All in one transaction.

        :raises NotFoundError: the source thread does not exist.
        """
        with self._executor.transaction():
            source = self.threads.get(from_thread_id)
            if source is None:
                raise NotFoundError(_THREADS, from_thread_id,
                                    f"{_THREADS}: cannot fork thread {from_thread_id!r}: it does not exist")
            now = now_ms()
            thread = {**source, "id": new_thread_id, "createdAt": now, "updatedAt": now}
            self.threads.set(new_thread_id, thread)
            messages = [{k: v for k, v in m.items() if k not in _PLACEMENT}
                        for m in self.messages.list(from_thread_id)]
            copies: Sequence[Mapping[str, Any]] = messages if transform is None else list(transform(messages))
            if copies:
                self.messages.append(new_thread_id, copies)
        return thread
