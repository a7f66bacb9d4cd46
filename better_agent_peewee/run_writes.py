"""The two transactions of a tracked run, its start and its end, and the final events it writes.

`tracking.TrackedRun` lives the run; this module writes its records ("on entry" and "at the
end" in tracking.py's docstring): the start claims the run id, creates or bumps the thread, appends
the input messages and opens the stream; the end stores the final event and status, bumps the
thread and closes the stream. Each is one transaction, run again when the server rolls it back.
"""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from .errors import ConflictError, ConnectionLostError, NotFoundError, RecordError, RunAborted
from .executor import read_back_after
from .heartbeats import Heartbeats
from .records import now_ms

if TYPE_CHECKING:
    from .memory import Memory
    from .streams import Streams
    from .tables import Tables

__all__ = ["RunRecords", "RunWrites", "finished_event", "error_event", "unstored"]

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


class _ThreadCreatedMeanwhile(Exception):
    """The start found no thread, but another run created it before this one could: the start
    is rolled back and run again as a start on that thread (its scope checked, its state read)."""

    def __init__(self, thread: Dict[str, Any]) -> None:
        super().__init__(thread.get("id"))
        self.thread = thread


class RunWrites:
    """The start and the end of one tracked run, each one transaction (see the module docstring)."""

    def __init__(self, runs: RunRecords, memory: Optional[Memory], streams: Optional[Streams], tables: Tables,
                 run_id: str, agent_name: str, thread_id: Optional[str], *, scope: Optional[str], config: Any,
                 state: Any, messages: Optional[Sequence[Mapping[str, Any]]],
                 run_input: Optional[Mapping[str, Any]]) -> None:
        if messages is not None and (isinstance(messages, (str, bytes, Mapping))
                                     or not isinstance(messages, Sequence)):
            raise RecordError("memoryMessages", None, f"messages must be a list of message dicts, "
                                                      f"got {type(messages).__name__}")
        if messages and thread_id is None:
            raise ValueError(f"runs: run {run_id!r} has input messages but no thread_id to store them in")
        if state is not None and memory is not None:
            memory.threads.check_state(state)  # RecordError now: nothing is written
        if run_input is not None and not isinstance(run_input, Mapping):
            raise ValueError(f"run_input must be a dict (RUN_STARTED's input), "
                             f"got {type(run_input).__name__}")
        self._runs, self._memory, self._streams = runs, memory, streams
        self._executor = tables.executor
        self._models = tables.models
        self.run_id, self.agent_name, self.thread_id = run_id, agent_name, thread_id
        self._scope, self._config, self._state = scope, config, state
        self._messages = list(messages) if messages else []
        self._run_input = dict(run_input) if run_input is not None else None

    # -- the start -----------------------------------------------------------------------

    def start(self) -> Tuple[Dict[str, Any], Any]:
        """Write the start of the run in one transaction; the running record and the run's state
        (the input state, else its thread's).

        :raises ConflictError: a run with this id exists and is still running.
        :raises NotFoundError: the thread is in another scope than the run's.
        :raises RecordError: a field, config or message cannot be stored.
        """
        # Run again when the server rolls it back (a deadlock: runs of one thread starting and
        # ending at once) or the connection is lost before COMMIT: nothing of a failed try remains.
        start = self._executor.transaction(retries=_RETRIES)(self._start)
        try:
            return start(None)  # type: ignore[no-any-return]
        except _ThreadCreatedMeanwhile as lost:
            # Another run created the thread first (its record is kept): start again on it, as
            # on any existing thread. (Passed on: a caller's open transaction may not see it yet.)
            return start(lost.thread)  # type: ignore[no-any-return]

    def _start(self, seen: Optional[Dict[str, Any]]) -> Tuple[Dict[str, Any], Any]:
        """The start, inside its transaction, on the thread `seen` (None: as read now)."""
        memory, streams, thread_id = self._memory, self._streams, self.thread_id
        # Without the memory domain there is no thread to read or write (as Better Agent without memory).
        thread = seen
        if thread is None and memory is not None and thread_id is not None:
            thread = memory.threads.get(thread_id)
        scope = self._scope_in(thread)
        record = self._claim(scope)
        now: int = record["startedAt"]  # as Better Agent: one clock reading for the whole start
        state = self._state
        if memory is not None and thread_id is not None:
            state = self._write_thread(memory, thread_id, thread, scope, now)
            if self._messages:
                memory.messages.append(thread_id, self._messages, run_id=self.run_id)
        if streams is not None:  # without the streams domain the run is recorded, no event is
            streams.open(self.run_id)
            started = {"type": "RUN_STARTED", "timestamp": now, "runId": self.run_id,
                       "threadId": thread_id or ""}
            if self._run_input is not None:
                started["input"] = self._run_input
            streams.append(self.run_id, started)
        return record, state

    def _scope_in(self, thread: Optional[Dict[str, Any]]) -> Optional[str]:
        """The run's scope: the one given, else its thread's (as Better Agent); NotFoundError when
        the thread is in another scope."""
        scope = self._scope
        if thread is None:
            return scope
        if scope is None:
            found: Optional[str] = thread.get("scope")
            return found
        if thread.get("scope") not in (None, scope):
            # Checked here, in the start's transaction: a server checks the thread's scope before,
            # and a thread of another caller created since must not take this run's writes.
            raise NotFoundError("memoryThreads", self.thread_id, f"runs: cannot start run {self.run_id!r} "
                                f"in scope {scope!r}: thread {self.thread_id!r} not found in that scope")
        return scope

    def _write_thread(self, memory: Memory, thread_id: str, thread: Optional[Dict[str, Any]],
                      scope: Optional[str], now: int) -> Any:
        """Create the thread or write its state or bump its ``updatedAt``; the run's state."""
        given = self._state
        if thread is None:
            new: Dict[str, Any] = {"id": thread_id, "agentName": self.agent_name,
                                   "createdAt": now, "updatedAt": now}
            if scope is not None:
                new["scope"] = scope
            if given is not None:
                new["state"] = given
            # Insert-only: a thread another run created since the read above is not overwritten.
            winner = memory.threads.create(thread_id, new)
            if winner is not None:
                raise _ThreadCreatedMeanwhile(winner)
        elif given is not None:  # the run's input state, as the thread's from now on
            memory.threads.set_state(thread_id, given, now)
        else:
            memory.threads.touch(thread_id, now)
        # As Better Agent: the input state, else the thread's (``input.state ?? thread.state``).
        return given if given is not None else (thread or {}).get("state")

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

    # -- the end -------------------------------------------------------------------------

    def end(self, status: str, final: Dict[str, Any], state: Any) -> bool:
        """Write the end of the run in one transaction; False if it had already ended.

        A COMMIT whose reply was lost is settled by reading the run back: ended with this final
        event means it was written; still running means it was not, and it is written again.
        """
        end = self._executor.transaction(retries=_RETRIES)(self._end)
        try:
            done: bool = end(status, final, state)
        except ConnectionLostError as lost:
            if not lost.maybe_applied or self._executor.database.in_transaction():
                raise
            run = read_back_after(lost, lambda: self._runs.get(self.run_id))
            if run is not None and run["status"] == "running":
                done = end(status, final, state)
            else:  # the final event's type and timestamp tell ours from another writer's
                event = (run or {}).get("finalEvent") or {}
                done = run is not None and run["status"] == status and \
                    (event.get("type"), event.get("timestamp")) == (final["type"], final["timestamp"])
        return done

    def _end(self, status: str, final: Dict[str, Any], state: Any) -> bool:
        """The end, inside its transaction; False if the run had already ended."""
        if not self._runs.finish(self.run_id, status, final):
            return False
        # The thread before the stream, as on entry: both transactions lock in one order.
        memory, streams = self._memory, self._streams
        if memory is not None and self.thread_id is not None and status in ("completed", "interrupted"):
            if state is not None:
                memory.threads.set_state(self.thread_id, state, now_ms())
            else:
                memory.threads.touch(self.thread_id, now_ms())
        if streams is not None:
            streams.append(self.run_id, final)
            streams.close(self.run_id)
        return True

    # -- in between -----------------------------------------------------------------------

    def write_state(self, state: Any) -> None:
        """Write the run's `state` to its thread while the run runs, in one UPDATE (see
        `TrackedRun.set_state`); only checked when there is no thread or no memory domain.

        :raises NotFoundError: the thread was deleted meanwhile.
        :raises ConflictError: the run has ended.
        """
        threads = self._memory.threads if self._memory is not None else None
        if threads is None:
            return
        if self.thread_id is None:
            threads.check_state(state)
        elif not threads.set_state(self.thread_id, state, now_ms(), while_running=self.run_id):
            run = self._runs.get(self.run_id)
            if run is not None and run["status"] == "running":
                raise NotFoundError("memoryThreads", self.thread_id, f"runs: run {self.run_id!r} cannot keep "
                                    f"its state: thread {self.thread_id!r} was deleted")
            raise self.ended_elsewhere()

    def ended_elsewhere(self) -> ConflictError:
        """The error of a block whose end found the run already ended by someone else."""
        run = self._runs.get(self.run_id) or {}
        return ConflictError(f"runs: run {self.run_id!r} had already ended ({run.get('status', 'deleted')}: "
                             f"{(run.get('finalEvent') or {}).get('message', 'no message')}) "
                             "before this block ended it; its outcome was not recorded")


def finished_event(run_id: str, thread_id: Optional[str], result: Any,
                   interrupts: Optional[Sequence[Any]]) -> Tuple[str, Dict[str, Any]]:
    """(status, RUN_FINISHED event) of a run that ends with `result` or `interrupts` (see
    `TrackedRun.finish`); ValueError for both, or for interrupts that are not a non-empty list."""
    base = {"type": "RUN_FINISHED", "timestamp": now_ms(), "runId": run_id, "threadId": thread_id or ""}
    if interrupts is None:
        final = {**base, "outcome": "success"}
        if result is not None:
            final["result"] = result
        return "completed", final
    if result is not None:
        raise ValueError("runs: an interrupted run ends with interrupts, not a result")
    if isinstance(interrupts, (str, bytes, Mapping)) or not isinstance(interrupts, Sequence) \
            or not interrupts:
        raise ValueError(f"runs: interrupts must be a non-empty list, got {interrupts!r:.80}")
    return "interrupted", {**base, "outcome": "interrupt", "interrupts": list(interrupts)}


def error_event(exc: BaseException) -> Tuple[str, Dict[str, Any]]:
    """(status, RUN_ERROR event) of a run that `exc` ended, as Better Agent's runtime records it:
    its message and its ``code`` when a non-empty string; `aborted` for code ABORTED, else failed."""
    code = getattr(exc, "code", None)
    code = code if isinstance(code, str) and code else None
    final = {"type": "RUN_ERROR", "timestamp": now_ms(), "message": _storable(str(exc) or type(exc).__name__)}
    if code is not None:
        final["code"] = _storable(code)
    return ("aborted" if code == RunAborted.code else "failed"), final


def unstored(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """`messages` as the records of a run without a thread: copies, each with an ``id``."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) \
            or not all(isinstance(m, Mapping) for m in messages):
        raise RecordError("memoryMessages", None, "messages must be a list of message dicts")
    return [{**m, "id": m.get("id") or str(uuid.uuid4())} for m in messages]


def _storable(text: str) -> str:
    """`text` without what no dialect stores (NUL, lone surrogates), so an error message always goes in."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
