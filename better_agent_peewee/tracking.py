"""A run's whole life in one block: `storage.runs.track(...)`.

Better Agent's own runtime writes a run in this order, and `track` writes the same
records, so a TypeScript UI shows a run executed here like one of its own:

* on entry, in one transaction: the `running` run record (its `scope` is the thread's
  when not given), the thread created (``agentName``, ``createdAt`` = ``updatedAt`` =
  now) or its ``updatedAt`` bumped, the input messages appended with the run's id, the
  stream opened, and a ``RUN_STARTED`` event (``runId``, ``threadId``) as its event 1;
* in the block: the caller's events (`emit`), messages (`append_messages`) and abort
  checks (`check_abort`); each of these also sets the run's ``updatedAt`` to now when
  `heartbeat_interval` seconds have passed since it was last set (the heartbeat), and so
  does the storage's heartbeat thread while the block runs (`heartbeats`), however long a
  step stays silent, so followers and `reap_stale` tell a live run from a dead one;
* at the end, in one transaction: the final event appended to the stream and stored on
  the run (``RUN_FINISHED`` with ``outcome`` "success" or "interrupt"; ``RUN_ERROR`` with
  ``message`` and ``code`` when the exception has a string ``code``), the status
  (completed, interrupted, failed, or aborted when the code is ``ABORTED``), the stream
  closed, and on success the thread's ``updatedAt`` bumped.

A worker that dies inside the block (killed, or its database connection lost) leaves a
run that says `running`: `reap_stale` marks it failed and ends its stream.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from .checks import is_int
from .errors import (
    ConflictError,
    ConnectionLostError,
    NotFoundError,
    RecordError,
    RunAborted,
    RunEndedElsewhere,
)
from .executor import read_back_after
from .heartbeats import Heartbeats
from .records import FINAL_EVENT_TYPES, check_key, now_ms

if TYPE_CHECKING:
    from .memory import Memory
    from .streams import Streams
    from .tables import Tables

logger = logging.getLogger(__name__)

__all__ = ["TrackedRun", "RunRecords", "ABORT_CHECK_INTERVAL", "HEARTBEAT_INTERVAL"]

_RUNS = "runs"
#: Seconds between two reads of the abort stamp by `check_abort` (the first call always reads).
ABORT_CHECK_INTERVAL = 0.2
#: Seconds between two heartbeats (the run's ``updatedAt`` set to now): a quarter of the followers'
#: ``followers.STALE_AFTER`` (40), so a follower of a killed worker ends within a minute; the
#: heartbeat thread sends one UPDATE per interval for all of a process's tracked runs.
HEARTBEAT_INTERVAL = 10.0
#: Reruns of the start and end transactions when the server rolls one back (deadlock, serialization).
_RETRIES = 4


class RunRecords(Protocol):
    """What a tracked run asks of the run records: the methods of `Runs` (``storage.runs``) it
    calls. Named here, not imported, because runs.py sits above this module: `Runs.track`
    builds the `TrackedRun` and hands itself in ("Layers" in docs/architecture.md)."""

    def start(self, run_id: str, agent_name: str, thread_id: Optional[str] = None,
              scope: Optional[str] = None, config: Any = None, *, replace: bool = False) -> Dict[str, Any]:
        """Write the running record; ConflictError when the id exists."""

    def get(self, run_id: str) -> Optional[Dict[str, Any]]:
        """The run record, or None."""

    def finish(self, run_id: str, status: str, final_event: Optional[Mapping[str, Any]] = None) -> bool:
        """End a running run; whether this call did."""

    def heartbeat(self, run_id: str) -> bool:
        """Set a running run's updatedAt to now; whether it is running."""

    def abort_requested(self, run_id: str) -> bool:
        """Whether an abort of the run was requested."""

    def abort_state(self, run_id: str) -> Tuple[bool, Optional[str]]:
        """(abort requested, status) in one read; (False, None) for no such run."""

    @property
    def heartbeats(self) -> Heartbeats:
        """The storage's heartbeat thread."""


class TrackedRun:
    """One run, lived by a ``with`` block: what `storage.runs.track(...)` returns.

    ``with storage.runs.track(...) as run:`` writes the start of the run on entry and its
    end on exit. To make the run visible before a worker picks it up (so a client can
    follow its stream or abort it while it waits in a queue), call `start()` first and
    enter the block later, in any thread.
    """

    def __init__(self, runs: RunRecords, memory: Optional[Memory], streams: Optional[Streams], tables: Tables,
                 run_id: str, agent_name: str, *, thread_id: Optional[str] = None,
                 scope: Optional[str] = None, config: Any = None,
                 messages: Optional[Sequence[Mapping[str, Any]]] = None, state: Any = None,
                 abort_check_interval: float = ABORT_CHECK_INTERVAL,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 run_input: Optional[Mapping[str, Any]] = None) -> None:
        self.run_id: str = check_key(_RUNS, "runId", run_id)
        self.agent_name = agent_name
        self.thread_id = thread_id
        if messages is not None and (isinstance(messages, (str, bytes, Mapping))
                                     or not isinstance(messages, Sequence)):
            raise RecordError("memoryMessages", None, f"messages must be a list of message dicts, "
                                                      f"got {type(messages).__name__}")
        if messages and thread_id is None:
            raise ValueError(f"runs: run {run_id!r} has input messages but no thread_id to store them in")
        if state is not None and memory is not None:
            memory.threads.check_state(state)  # RecordError now: nothing is written
        for name, value in (("abort_check_interval", abort_check_interval),
                            ("heartbeat_interval", heartbeat_interval)):
            if not is_int(value, or_float=True) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r:.80}")
        #: The run's status as this object knows it: None before `start`, then running, then
        #: how it ended (completed, interrupted, failed, aborted).
        self.status: Optional[str] = None
        #: The run record written by `start`.
        self.record: Optional[Dict[str, Any]] = None
        #: The final event written when the run ended (None while it runs).
        self.final_event: Optional[Dict[str, Any]] = None
        #: The messages `append_messages` added in this run, in order (as stored; a run without
        #: a thread keeps them here only).
        self.messages: List[Dict[str, Any]] = []
        #: The run's state, kept in its thread: the `state` given, else (once started) the thread's
        #: own, as Better Agent's next run reads it; then what `set_state` or `finish` wrote.
        self.state: Any = state
        self._input_state = state
        self._final_state: Any = None  # what the end transaction writes (None: the state stays)
        self._runs, self._memory, self._streams = runs, memory, streams
        self._executor = tables.executor
        self._models = tables.models
        self._scope = scope
        self._config = config
        self._messages = list(messages) if messages else []
        if run_input is not None and not isinstance(run_input, Mapping):
            raise ValueError(f"run_input must be a dict (RUN_STARTED's input), "
                             f"got {type(run_input).__name__}")
        self._run_input = dict(run_input) if run_input is not None else None
        self._interval = float(abort_check_interval)
        self._next_check = 0.0
        self._beat_every = float(heartbeat_interval)
        self._next_beat = math.inf  # set by start: `updatedAt` is the start's time
        self._next_due = 0.0  # the earlier of the two: when check_abort has something to do
        self._aborted = False
        self._gone: Optional[RunEndedElsewhere] = None  # raised from now on: the run was ended by others
        self._stop_beating: Callable[[], Any] = _nothing

    def __repr__(self) -> str:
        return f"<TrackedRun {self.run_id!r} {self.status or 'not started'}>"

    # -- the start -----------------------------------------------------------------------

    def start(self) -> TrackedRun:
        """Write the start of the run now (entering the block then writes nothing more).

        All in one transaction: a bad message or a refused id writes nothing.

        :raises ConflictError: a run with this id exists and is still running.
        :raises RecordError: a field, config or message cannot be stored.
        """
        if self.status is not None:
            raise ConflictError(f"runs: run {self.run_id!r} was already started ({self.status})")
        # Run again when the server rolls it back (a deadlock: runs of one thread starting and
        # ending at once) or the connection is lost before COMMIT: nothing of a failed try remains.
        self.record = self._executor.transaction(retries=_RETRIES)(self._start)()
        self.status = "running"
        self._next_beat = time.monotonic() + self._beat_every
        beats = self._runs.heartbeats
        beats.add(self.run_id, self._beat_every)
        # A run started and never ended (the object dropped) must not beat for ever.
        self._stop_beating = weakref.finalize(self, beats.remove, self.run_id)
        return self

    def _start(self) -> Dict[str, Any]:
        """The entry, inside its transaction; the running record."""
        memory, streams = self._memory, self._streams
        # Without the memory domain there is no thread to read or write (as Better Agent without memory).
        thread = None
        if memory is not None and self.thread_id is not None:
            thread = memory.threads.get(self.thread_id)
        scope = self._scope
        if scope is None and thread is not None:
            scope = thread.get("scope")  # as Better Agent: the run is in its thread's scope
        elif thread is not None and thread.get("scope") not in (None, scope):
            # Checked here, in the start's transaction: a server checks the thread's scope before,
            # and a thread of another caller created since must not take this run's writes.
            raise NotFoundError("memoryThreads", self.thread_id, f"runs: cannot start run {self.run_id!r} "
                                f"in scope {scope!r}: thread {self.thread_id!r} not found in that scope")
        record = self._claim(scope)
        now: int = record["startedAt"]  # as Better Agent: one clock reading for the whole start
        if memory is not None and self.thread_id is not None:
            given = self._input_state
            if thread is None:
                new: Dict[str, Any] = {"id": self.thread_id, "agentName": self.agent_name,
                                       "createdAt": now, "updatedAt": now}
                if scope is not None:
                    new["scope"] = scope
                if given is not None:
                    new["state"] = given
                memory.threads.set(self.thread_id, new)
            elif given is not None:  # the run's input state, as the thread's from now on
                memory.threads.set_state(self.thread_id, given, now)
            else:
                memory.threads.touch(self.thread_id, now)
            # As Better Agent: the input state, else the thread's (``input.state ?? thread.state``).
            self.state = given if given is not None else (thread or {}).get("state")
            if self._messages:
                memory.messages.append(self.thread_id, self._messages, run_id=self.run_id)
        if streams is not None:  # without the streams domain the run is recorded, no event is
            streams.open(self.run_id)
            started = {"type": "RUN_STARTED", "timestamp": now, "runId": self.run_id,
                       "threadId": self.thread_id or ""}
            if self._run_input is not None:
                started["input"] = self._run_input
            streams.append(self.run_id, started)
        return record

    def _claim(self, scope: Optional[str]) -> Dict[str, Any]:
        """The running record, written if the id is free or its run has ended (then started over)."""
        runs, execute = self._runs, self._executor.execute_query
        args = (self.run_id, self.agent_name, self.thread_id, scope, self._config)
        try:
            record: Dict[str, Any] = runs.start(*args)
            return record
        except ConflictError:
            pass
        existing = runs.get(self.run_id)
        if existing is not None:
            if existing["status"] == "running":
                raise ConflictError(f"runs: run {self.run_id!r} is already running (started at "
                                    f"{existing['startedAt']} ms); "
                                    "a run id is tracked by one block at a time")
            # A run that ended is started over under the same id: its old events go with it.
            R = self._models.run
            deleted = execute(R.delete().where((R.run_id == self.run_id) & (R.status != "running")),
                              idempotent=True).rowcount
            if deleted != 1:
                raise ConflictError(f"runs: run {self.run_id!r} was started again by someone else meanwhile")
        if self._streams is not None:
            E, S = self._models.stream_event, self._models.stream
            execute(E.delete().where(E.run_id == self.run_id), idempotent=True)
            execute(S.delete().where(S.id == self.run_id), idempotent=True)
        record = runs.start(*args)
        return record

    def __enter__(self) -> TrackedRun:
        if self.status is None:
            self.start()
        elif self.status != "running":
            raise ConflictError(f"runs: run {self.run_id!r} has already ended ({self.status})")
        return self

    # -- in the block --------------------------------------------------------------------

    def emit(self, event: Mapping[str, Any]) -> int:
        """Append `event` (an AG-UI event dict) to the run's stream; its seq.

        A ``timestamp`` (now) is added when the event has none. The final event is the
        block's to write: end the block, raise, or call `finish` instead of emitting
        ``RUN_FINISHED`` or ``RUN_ERROR``.
        """
        self._require_running("emit an event")
        if type(event) is dict or isinstance(event, Mapping):  # (the type test first: it is cheaper)
            if event.get("type") in FINAL_EVENT_TYPES:
                raise ValueError(f"runs: run {self.run_id!r}: a {event.get('type')} event ends the run; "
                                 "call run.finish(...) or leave the block (raise to fail) "
                                 "instead of emitting it")
            if "timestamp" not in event:
                event = {**event, "timestamp": now_ms()}
        if self._streams is None:  # no streams domain: nothing is stored (as Better Agent without one)
            return 0
        try:
            seq: int = self._streams.append(self.run_id, event)
        except ConflictError as exc:  # the stream is closed: by whoever ended the run?
            ended = self._ended()
            if ended is not None:
                raise ended from exc
            raise
        if time.monotonic() >= self._next_beat:
            self.heartbeat()
        return seq

    def append_messages(self, messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """Append `messages` to the run's thread, recorded with the run's id; the records.

        A run without a thread stores none, as Better Agent's runtime (which keeps a run's
        messages only when it has a thread): they are kept in `messages` only, each with an ``id``.
        """
        self._require_running("append messages")
        if self.thread_id is None:
            records = _unstored(messages)
        elif self._memory is None:  # no memory domain: no thread to store them in (as Better Agent)
            records = _unstored(messages)
        else:
            records = self._memory.messages.append(self.thread_id, messages, run_id=self.run_id)
        self.messages.extend(records)
        if time.monotonic() >= self._next_beat:
            self.heartbeat()
        return records

    def set_state(self, state: Any) -> None:
        """Write the run's `state` to its thread now, as Better Agent's ``onState`` does: the
        thread's state and ``updatedAt`` only (a concurrent title or metadata change is kept),
        and only while the run is running, in one UPDATE. The next run on the thread reads it
        as its input state (TypeScript's and `track`'s alike). A run without a thread (or without
        the memory domain) keeps it in `state` only, as Better Agent does.

        :raises RecordError: `state` is not JSON (nothing is written).
        :raises ConflictError: the run has ended (here, or elsewhere: failed by `reap_stale`).
        :raises NotFoundError: the thread was deleted meanwhile.
        """
        self._require_running("set its state")
        threads = self._memory.threads if self._memory is not None else None
        if threads is not None and self.thread_id is None:
            threads.check_state(state)
        elif threads is not None and self.thread_id is not None and not threads.set_state(
                self.thread_id, state, now_ms(), while_running=self.run_id):
            run = self._runs.get(self.run_id)
            if run is not None and run["status"] == "running":
                raise NotFoundError("memoryThreads", self.thread_id, f"runs: run {self.run_id!r} cannot keep "
                                    f"its state: thread {self.thread_id!r} was deleted")
            raise self._ended_elsewhere()
        self.state = state
        if time.monotonic() >= self._next_beat:
            self.heartbeat()

    def heartbeat(self) -> bool:
        """Set the run's ``updatedAt`` to now (one conditional UPDATE); False if it is no longer running.

        `emit`, `append_messages` and `check_abort` call it by themselves once
        `heartbeat_interval` seconds have passed since the last one; call it yourself inside a
        step that stays silent for longer than `reap_stale`'s ``stale_after``.
        """
        self._require_running("send a heartbeat")
        self._next_beat = time.monotonic() + self._beat_every
        self._next_due = min(self._next_check, self._next_beat)
        return self._runs.heartbeat(self.run_id)

    def check_abort(self) -> None:
        """Raise `RunAborted` if an abort of this run was requested, or `RunEndedElsewhere` (a
        subclass) if the run was ended by someone else (failed by `reap_stale`, finished by
        another writer, deleted); cheap enough per token.

        The first call reads the run's abort stamp and status (one indexed read); later calls
        read them again only once `abort_check_interval` seconds (0.2 by default) have passed
        since the last read, so either is noticed within about that time. Once seen, every
        call raises, and the block writes nothing more for the run.
        """
        if self.status != "running":
            if self._gone is not None:
                raise self._gone
            return
        if not self._aborted:
            clock = time.monotonic()
            if clock < self._next_due:  # the per-token path: one clock reading, one comparison
                return
            if clock >= self._next_beat:
                self.heartbeat()
            if clock < self._next_check:
                return
            self._next_check = clock + self._interval
            self._next_due = min(self._next_check, self._next_beat)
            self._aborted, status = self._runs.abort_state(self.run_id)
            if status != "running":
                raise self._ended_by_others(status)
            if not self._aborted:
                return
        raise RunAborted(f"run {self.run_id!r} was aborted on request")

    def _ended(self) -> Optional[RunEndedElsewhere]:
        """`RunEndedElsewhere` (and this object marked so) if the run no longer runs, else None."""
        status = self._runs.abort_state(self.run_id)[1]
        return None if status == "running" else self._ended_by_others(status)

    def _ended_by_others(self, status: Optional[str]) -> RunEndedElsewhere:
        run = self._runs.get(self.run_id) if status is not None else None
        final = (run or {}).get("finalEvent")
        why = (final or {}).get("message") or ("the run was deleted" if status is None else "no message")
        self._gone = RunEndedElsewhere(f"run {self.run_id!r} was ended elsewhere "
                                       f"({status or 'deleted'}: {why}); stop working on it",
                                       self.run_id, status, final)
        self.status = "ended elsewhere"
        self._stop_beating()
        return self._gone

    def finish(self, result: Any = None, *, interrupts: Optional[Sequence[Any]] = None,
               state: Any = None) -> Dict[str, Any]:
        """End the run now with an explicit outcome; the final event.

        With `interrupts` (a non-empty list, as Better Agent's interrupts) the run is
        `interrupted` and the event is ``{"type": "RUN_FINISHED", "outcome": "interrupt",
        "interrupts": [...]}``; otherwise it is `completed` with ``"outcome": "success"`` and
        ``"result": result`` when given (Better Agent's is ``{"finishReason", "usage",
        "stepCount"}``). The rest of the block then writes nothing more. `state`, when given,
        is written to the thread in the same transaction, as Better Agent writes the result's
        state at the end (None: the state stays as it is).

        :raises ConflictError: the run had already ended (e.g. failed by `reap_stale`).
        """
        self._require_running("finish")
        base = {"type": "RUN_FINISHED", "timestamp": now_ms(), "runId": self.run_id,
                "threadId": self.thread_id or ""}
        if interrupts is not None:
            if result is not None:
                raise ValueError("runs: an interrupted run ends with interrupts, not a result")
            if isinstance(interrupts, (str, bytes, Mapping)) or not isinstance(interrupts, Sequence) or \
                    not interrupts:
                raise ValueError(f"runs: interrupts must be a non-empty list, got {interrupts!r:.80}")
            status, final = "interrupted", {**base, "outcome": "interrupt", "interrupts": list(interrupts)}
        else:
            status, final = "completed", {**base, "outcome": "success"}
            if result is not None:
                final["result"] = result
        if state is not None and self._memory is not None:
            self._memory.threads.check_state(state)  # RecordError now: nothing is written
        self._final_state = state
        if not self._end(status, final):
            raise self._ended_elsewhere()
        if state is not None:
            self.state = state
        return final

    # -- the end -------------------------------------------------------------------------

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if self.status != "running":  # finished explicitly, or ended by others: nothing left to write
            return isinstance(exc, RunAborted)
        if exc is None:
            final = {"type": "RUN_FINISHED", "timestamp": now_ms(), "runId": self.run_id,
                     "threadId": self.thread_id or "", "outcome": "success"}
            if not self._end("completed", final):
                raise self._ended_elsewhere()
            return False
        code = getattr(exc, "code", None)
        code = code if isinstance(code, str) and code else None
        status = "aborted" if code == RunAborted.code else "failed"
        final = {"type": "RUN_ERROR", "timestamp": now_ms(),
                 "message": _storable(str(exc) or type(exc).__name__)}
        if code is not None:
            final["code"] = _storable(code)
        try:
            recorded = self._end(status, final)
        except Exception as failure:
            if isinstance(exc, RunAborted):
                raise  # the abort was not recorded: the caller must hear of it
            logger.error("run %r: could not record that it %s (%s); reap_stale will mark it failed",
                         self.run_id, status, failure, exc_info=True)
            return False
        if not recorded:
            logger.warning("run %r ended (%s: %s) after it had already been ended elsewhere; kept the first "
                           "outcome", self.run_id, status, final["message"])
        return isinstance(exc, RunAborted)

    def _end(self, status: str, final: Dict[str, Any]) -> bool:
        """Write the end of the run in one transaction; False if it had already ended.

        A COMMIT whose reply was lost is settled by reading the run back: ended with this final
        event means it was written; still running means it was not, and it is written again.
        """
        end = self._executor.transaction(retries=_RETRIES)(self._finish)
        self._stop_beating()  # (whatever comes of it: the block is over)
        try:
            done: bool = end(status, final)
        except ConnectionLostError as lost:
            if not lost.maybe_applied or self._executor.database.in_transaction():
                raise
            run = read_back_after(lost, lambda: self._runs.get(self.run_id))
            if run is not None and run["status"] == "running":
                done = end(status, final)
            else:  # the final event's type and timestamp tell ours from another writer's
                event = (run or {}).get("finalEvent") or {}
                done = run is not None and run["status"] == status and \
                    (event.get("type"), event.get("timestamp")) == (final["type"], final["timestamp"])
        if not done:
            self.status = "ended elsewhere"
            return False
        self.status, self.final_event = status, final
        return True

    def _finish(self, status: str, final: Dict[str, Any]) -> bool:
        """The end, inside its transaction; False if the run had already ended."""
        if not self._runs.finish(self.run_id, status, final):
            return False
        # The thread before the stream, as on entry: both transactions lock in one order.
        memory, streams = self._memory, self._streams
        if memory is not None and self.thread_id is not None and status in ("completed", "interrupted"):
            if self._final_state is not None:
                memory.threads.set_state(self.thread_id, self._final_state, now_ms())
            else:
                memory.threads.touch(self.thread_id, now_ms())
        if streams is not None:
            streams.append(self.run_id, final)
            streams.close(self.run_id)
        return True

    def _require_running(self, what: str) -> None:
        if self._gone is not None:
            raise self._gone
        if self.status != "running":
            state = "has not started" if self.status is None else f"has ended ({self.status})"
            raise ConflictError(f"runs: cannot {what}: run {self.run_id!r} {state}")

    def _ended_elsewhere(self) -> ConflictError:
        run = self._runs.get(self.run_id) or {}
        return ConflictError(f"runs: run {self.run_id!r} had already ended ({run.get('status', 'deleted')}: "
                             f"{(run.get('finalEvent') or {}).get('message', 'no message')}) "
                             "before this block ended it; its outcome was not recorded")


def _unstored(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """`messages` as the records of a run without a thread: copies, each with an ``id``."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) \
            or not all(isinstance(m, Mapping) for m in messages):
        raise RecordError("memoryMessages", None, "messages must be a list of message dicts")
    return [{**m, "id": m.get("id") or str(uuid.uuid4())} for m in messages]


def _storable(text: str) -> str:
    """`text` without what no dialect stores (NUL, lone surrogates), so an error message always goes in."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _nothing() -> None:
    """What `_stop_beating` is before the run started."""
