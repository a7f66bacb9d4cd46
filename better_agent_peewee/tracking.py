"""A run's whole life in one block: `storage.runs.track(...)`.

Better Agent's own runtime writes a run in this order, and `track` writes the same
records, so a TypeScript UI shows a run executed here like one of its own:

* on entry, in one transaction: the `running` run record (its `scope` is the thread's
  when not given), the thread created (``agentName``, ``createdAt`` = ``updatedAt`` =
  now; insert-only: a thread another run created meanwhile is kept, and this run is then
  checked against it like any run on an existing thread) or its ``updatedAt`` bumped, the
  input messages appended with the run's id, the stream opened, and a ``RUN_STARTED``
  event (``runId``, ``threadId``) as its event 1;
* in the block: the caller's events (`emit`), messages (`append_messages`, stored only
  while the run is running: checked in the append's transaction) and abort
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

`TrackedRun` is the block; what it checks while it runs (its status, abort requests, runs
ended elsewhere, heartbeats) is `RunChecks`, and its two transactions are
`run_writes.RunWrites`.
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence

from .checks import is_int
from .errors import ConflictError, RunAborted, RunEndedElsewhere
from .records import FINAL_EVENT_TYPES, check_key, now_ms
from .run_writes import RunRecords, RunWrites, error_event, finished_event, unstored

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


class RunChecks:
    """What a tracked run checks while it runs: its status here, and in the database whether an
    abort was requested or someone else ended it; with its heartbeats (`TrackedRun` is one)."""

    def __init__(self, runs: RunRecords, run_id: str, abort_check_interval: float,
                 heartbeat_interval: float) -> None:
        for name, value in (("abort_check_interval", abort_check_interval),
                            ("heartbeat_interval", heartbeat_interval)):
            if not is_int(value, or_float=True) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r:.80}")
        self.run_id = run_id
        #: The run's status as this object knows it: None before `start`, then running, then
        #: how it ended (completed, interrupted, failed, aborted).
        self.status: Optional[str] = None
        self._runs = runs
        self._interval = float(abort_check_interval)
        self._next_check = 0.0
        self._beat_every = float(heartbeat_interval)
        self._next_beat = math.inf  # set by start: `updatedAt` is the start's time
        self._next_due = 0.0  # the earlier of the two: when check_abort has something to do
        self._aborted = False
        self._gone: Optional[RunEndedElsewhere] = None  # raised from now on: the run was ended by others
        self._stop_beating: Callable[[], Any] = _nothing

    def _start_beating(self) -> None:
        """The run is running from now on: the heartbeat thread keeps its ``updatedAt`` fresh."""
        self.status = "running"
        self._next_beat = time.monotonic() + self._beat_every
        beats = self._runs.heartbeats
        beats.add(self.run_id, self._beat_every)
        # A run started and never ended (the object dropped) must not beat for ever.
        self._stop_beating = weakref.finalize(self, beats.remove, self.run_id)

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

    def check_abort(self, message: Optional[str] = None) -> None:
        """Raise `RunAborted` if an abort of this run was requested, or `RunEndedElsewhere` (a
        subclass) if the run was ended by someone else (failed by `reap_stale`, finished by
        another writer, deleted); cheap enough per token.

        `message` is the abort's message (the RUN_ERROR's ``message``), naming where the run
        stopped as Better Agent's runtime does with ``checkAbort(message)``, e.g. "Run aborted
        after model generation."; by default "run '<id>' was aborted on request".

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
        raise RunAborted(message if message is not None else f"run {self.run_id!r} was aborted on request")

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

    def _require_running(self, what: str) -> None:
        if self._gone is not None:
            raise self._gone
        if self.status != "running":
            state = "has not started" if self.status is None else f"has ended ({self.status})"
            raise ConflictError(f"runs: cannot {what}: run {self.run_id!r} {state}")


class TrackedRun(RunChecks):
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
        super().__init__(runs, check_key(_RUNS, "runId", run_id), abort_check_interval, heartbeat_interval)
        self.agent_name = agent_name
        self.thread_id = thread_id
        # (Checks the input too: a bad message, state or run_input raises now, writing nothing.)
        self._writes = RunWrites(runs, memory, streams, tables, self.run_id, agent_name, thread_id,
                                 scope=scope, config=config, state=state, messages=messages,
                                 run_input=run_input)
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
        self._final_state: Any = None  # what the end transaction writes (None: the state stays)
        self._memory, self._streams = memory, streams

    def __repr__(self) -> str:
        return f"<TrackedRun {self.run_id!r} {self.status or 'not started'}>"

    # -- the start -----------------------------------------------------------------------

    def start(self) -> TrackedRun:
        """Write the start of the run now (entering the block then writes nothing more).

        All in one transaction: a bad message or a refused id writes nothing.

        :raises ConflictError: a run with this id exists and is still running.
        :raises NotFoundError: the thread is in another scope than the run's (also when another
            run created it meanwhile: creating a thread never overwrites one).
        :raises RecordError: a field, config or message cannot be stored.
        """
        if self.status is not None:
            raise ConflictError(f"runs: run {self.run_id!r} was already started ({self.status})")
        self.record, self.state = self._writes.start()
        self._start_beating()
        return self

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
        The append and the check that the run is still running are one statement (a batch: one
        transaction), the run's row locked, so a run that was ended elsewhere gets none of them.

        :raises RunEndedElsewhere: the run was ended by someone else (failed by `reap_stale`,
            finished or aborted by another writer, deleted); nothing is written, and the block
            then ends quietly, as after `check_abort` raised it.
        :raises RecordError: a message cannot be stored (nothing is written).
        """
        self._require_running("append messages")
        if self.thread_id is None or self._memory is None:
            # No thread, or no memory domain: nothing to store them in (as Better Agent).
            records = unstored(messages)
        else:
            try:
                records = self._memory.messages.append(self.thread_id, messages, run_id=self.run_id,
                                                       while_running=self.run_id)
            except ConflictError as exc:  # the run no longer runs? (or a message id is taken)
                ended = self._ended()
                if ended is not None:
                    raise ended from exc
                raise
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
        self._writes.write_state(state)
        self.state = state
        if time.monotonic() >= self._next_beat:
            self.heartbeat()

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
        status, final = finished_event(self.run_id, self.thread_id, result, interrupts)
        if state is not None and self._memory is not None:
            self._memory.threads.check_state(state)  # RecordError now: nothing is written
        self._final_state = state
        if not self._end(status, final):
            raise self._writes.ended_elsewhere()
        if state is not None:
            self.state = state
        return final

    # -- the end -------------------------------------------------------------------------

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if self.status != "running":  # finished explicitly, or ended by others: nothing left to write
            return isinstance(exc, RunAborted)
        if exc is None:
            if not self._end(*finished_event(self.run_id, self.thread_id, None, None)):
                raise self._writes.ended_elsewhere()
            return False
        status, final = error_event(exc)
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
        """Write the end of the run (`RunWrites.end`); False if it had already ended elsewhere."""
        self._stop_beating()  # (whatever comes of it: the block is over)
        if not self._writes.end(status, final, self._final_state):
            self.status = "ended elsewhere"
            return False
        self.status, self.final_event = status, final
        return True



def _nothing() -> None:
    """What `_stop_beating` is before the run started."""
