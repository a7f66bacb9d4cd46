"""storage.runs.track: a run's whole life in one block, written as Better Agent's runtime writes it."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import peewee
import pytest

from better_agent_peewee import (
    AbortRequest,
    ConflictError,
    NotFoundError,
    RecordError,
    RunAborted,
    RunEndedElsewhere,
    StorageError,
    create_tables,
    peewee_storage,
    reap_stale,
    tracking,
)
from better_agent_peewee.records import now_ms
from tests.samples import snapshot

REPO = Path(__file__).resolve().parent.parent

#: The fields of Better Agent's RunRecord (packages/core/src/storage/types.ts).
TS_RUN_FIELDS = {"runId", "agentName", "threadId", "scope", "status", "abortRequestedAt", "finalEvent",
                 "config", "startedAt", "updatedAt", "finishedAt"}


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def events(storage: Any, run_id: str) -> List[Dict[str, Any]]:
    """The stream's event records, read the way a TypeScript reader lists them."""
    items: List[Dict[str, Any]] = storage.list("streamEvents", {"where": {"runId": run_id},
                                                                "orderBy": {"seq": "asc"}})["items"]
    return items


class ProviderError(Exception):
    code = "PROVIDER_ERROR"


def test_a_thread_of_another_scope_takes_no_writes_of_a_run(storage: Any) -> None:
    # The server checks the thread's scope before the start; a thread another caller created
    # since (same id, their scope) must not receive this run's messages, state or updatedAt.
    theirs = {"id": "t1", "agentName": "support", "scope": "subject:bob", "createdAt": 1, "updatedAt": 1}
    storage.memory.threads.set("t1", theirs)
    run = storage.runs.track("r1", "support", thread_id="t1", scope="subject:alice", state={"mine": 1},
                             messages=[{"id": "m1", "role": "user", "content": "Hi"}])
    with pytest.raises(NotFoundError, match="'t1' not found in that scope"):
        run.start()
    assert storage.get("memoryThreads", "t1") == theirs
    assert storage.memory.messages.list("t1") == []
    assert storage.get("runs", "r1") is None and storage.get("streams", "r1") is None
    # A thread without a scope, or in the run's own, is the run's as before.
    with storage.runs.track("r2", "support", thread_id="t1", scope="subject:bob"):
        pass
    storage.memory.threads.set("t2", {"id": "t2", "agentName": "support", "createdAt": 1, "updatedAt": 1})
    with storage.runs.track("r3", "support", thread_id="t2", scope="subject:alice"):
        pass
    assert storage.get("runs", "r3")["status"] == "completed"


def test_a_clean_block_writes_what_better_agent_writes(storage: Any) -> None:
    t0 = now_ms()
    question = {"id": "m1", "role": "user", "content": "Hi"}
    with storage.runs.track("r1", "support", thread_id="t1", scope="user-7", config={"maxSteps": 3},
                            messages=[question]) as run:
        running = storage.get("runs", "r1")
        assert running == {"runId": "r1", "agentName": "support", "threadId": "t1", "scope": "user-7",
                           "status": "running", "config": {"maxSteps": 3}, "startedAt": running["startedAt"],
                           "updatedAt": running["startedAt"]}
        assert storage.get("streams", "r1")["status"] == "open"
        thread = storage.get("memoryThreads", "t1")
        assert thread == {"id": "t1", "agentName": "support", "scope": "user-7",
                          "createdAt": thread["createdAt"],
                          "updatedAt": thread["createdAt"]} and t0 <= thread["createdAt"]
        assert run.emit({"type": "TEXT_MESSAGE_START", "messageId": "m2", "role": "assistant"}) == 2
        for i, word in enumerate(["Hello", " there"]):
            run.check_abort()
            assert run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m2", "delta": word}) == 3 + i
        run.emit({"type": "TEXT_MESSAGE_END", "messageId": "m2", "timestamp": 1_700_000_000_000})
        run.append_messages([{"id": "m2", "role": "assistant", "content": "Hello there"}])
    t1 = now_ms()

    rec = storage.get("runs", "r1")
    assert set(rec) <= TS_RUN_FIELDS
    final = rec["finalEvent"]
    assert final == {"type": "RUN_FINISHED", "timestamp": final["timestamp"], "runId": "r1", "threadId": "t1",
                     "outcome": "success"}
    assert rec["status"] == "completed" \
        and t0 <= rec["startedAt"] <= rec["finishedAt"] == rec["updatedAt"] <= t1
    assert run.status == "completed" and run.final_event == final

    stored = events(storage, "r1")
    assert [e["seq"] for e in stored] == list(range(1, 7))
    assert [e["id"] for e in stored] == [f"r1:{n}" for n in range(1, 7)]
    assert [e["event"]["type"] for e in stored] == ["RUN_STARTED", "TEXT_MESSAGE_START",
                                                    "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT",
                                                    "TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert stored[0]["event"] == {"type": "RUN_STARTED", "timestamp": stored[0]["timestamp"], "runId": "r1",
                                  "threadId": "t1"}
    assert stored[-1]["event"] == final  # the stream's last event is the run's final event
    assert all(e["timestamp"] == e["event"]["timestamp"] for e in stored)  # every event carries one
    assert stored[4]["timestamp"] == 1_700_000_000_000
    stream = storage.get("streams", "r1")
    assert stream["status"] == "closed" and rec["finishedAt"] <= stream["closedAt"] <= t1

    messages = storage.memory.messages.list("t1")
    assert [(m["id"], m["role"], m["runId"]) for m in messages] == [("m1", "user", "r1"),
                                                                    ("m2", "assistant", "r1")]
    thread = storage.get("memoryThreads", "t1")
    assert thread["updatedAt"] >= rec["finishedAt"]
    assert [e["type"] for e in storage.streams.resume("r1", 0, timeout=5)][-1] == "RUN_FINISHED"


def test_an_existing_thread_is_bumped_and_lends_its_scope(storage: Any) -> None:
    storage.memory.threads.set("t1", {"id": "t1", "agentName": "support", "scope": "org-1",
                                      "title": "Billing", "createdAt": 1_000, "updatedAt": 2_000})
    with storage.runs.track("r1", "support", thread_id="t1") as run:
        assert storage.runs.get("r1")["scope"] == "org-1"  # as Better Agent: the thread's scope
        entered = storage.get("memoryThreads", "t1")
        assert entered["updatedAt"] >= run.record["startedAt"] and entered["title"] == "Billing"
    thread = storage.get("memoryThreads", "t1")
    assert thread["createdAt"] == 1_000 and thread["title"] == "Billing" and thread["scope"] == "org-1"
    assert thread["updatedAt"] >= storage.runs.get("r1")["finishedAt"]


def test_a_run_without_a_thread(storage: Any) -> None:
    with storage.runs.track("r1", "batch") as run:
        run.emit({"type": "CUSTOM", "name": "x"})
        # As Better Agent: a run without a thread keeps its messages on the run, stores none.
        kept = run.append_messages([{"role": "assistant", "content": "x"}, {"id": "m2", "role": "tool"}])
        assert kept == run.messages and kept[1] == {"id": "m2", "role": "tool"} and kept[0]["id"]
    rec = storage.runs.get("r1")
    assert "threadId" not in rec and rec["finalEvent"]["threadId"] == "" and rec["status"] == "completed"
    assert storage.list("memoryThreads")["items"] == []
    with pytest.raises(ValueError, match="no thread_id"):
        storage.runs.track("r2", "batch", messages=[{"role": "user", "content": "x"}])


def test_an_exception_fails_the_run_and_propagates(storage: Any) -> None:
    with pytest.raises(ProviderError, match="model unavailable"):
        with storage.runs.track("r1", "support", thread_id="t1") as run:
            run.emit({"type": "STEP_STARTED", "stepName": "1"})
            entered = storage.memory.threads.get("t1")
            raise ProviderError("model unavailable")
    rec = storage.runs.get("r1")
    final = rec["finalEvent"]
    assert rec["status"] == "failed" and "finishedAt" in rec
    assert final == {"type": "RUN_ERROR", "timestamp": final["timestamp"], "message": "model unavailable",
                     "code": "PROVIDER_ERROR"}
    stored = events(storage, "r1")
    assert [e["event"]["type"] for e in stored] == ["RUN_STARTED", "STEP_STARTED", "RUN_ERROR"]
    assert stored[-1]["event"] == final and storage.streams.get("r1")["status"] == "closed"
    # As Better Agent: a failed run leaves the thread's updatedAt where the start put it.
    assert storage.memory.threads.get("t1") == entered

    with pytest.raises(KeyError):
        with storage.runs.track("r2", "support"):
            raise KeyError("missing")
    rec = storage.runs.get("r2")
    assert rec["status"] == "failed" and rec["finalEvent"]["message"] == "'missing'"
    assert "code" not in rec["finalEvent"]  # no string code on a KeyError

    class HttpError(Exception):
        code = 503  # not a string: Better Agent keeps only string codes

    with pytest.raises(HttpError):
        with storage.runs.track("r3", "support"):
            raise HttpError()
    assert storage.runs.get("r3")["finalEvent"] == {
        "type": "RUN_ERROR", "message": "HttpError",
        "timestamp": storage.runs.get("r3")["finalEvent"]["timestamp"]}
    with pytest.raises(ValueError):
        with storage.runs.track("r4", "support"):
            raise ValueError("bad \x00 byte \ud800")  # what no dialect stores is escaped, not lost
    assert storage.runs.get("r4")["finalEvent"]["message"] == "bad \\x00 byte \\ud800"


def test_an_abort_ends_the_block_quietly(storage: Any) -> None:
    steps = []
    with storage.runs.track("r1", "support", thread_id="t1", abort_check_interval=0) as run:
        for step in range(10):
            run.check_abort()
            steps.append(step)
            run.emit({"type": "STEP_FINISHED", "stepName": str(step)})
            if step == 2:
                assert storage.runs.request_abort("r1") is AbortRequest.REQUESTED
    assert steps == [0, 1, 2]
    rec = storage.runs.get("r1")
    assert rec["status"] == "aborted" and "abortRequestedAt" in rec
    assert rec["finalEvent"]["code"] == "ABORTED" and rec["finalEvent"]["type"] == "RUN_ERROR"
    assert events(storage, "r1")[-1]["event"] == rec["finalEvent"]
    assert storage.streams.get("r1")["status"] == "closed"
    assert storage.runs.request_abort("r1") is AbortRequest.NOT_RUNNING

    with storage.runs.track("r2", "support") as run:  # raised by the worker itself
        raise RunAborted("the user closed the tab")
    assert storage.runs.get("r2")["finalEvent"]["message"] == "the user closed the tab"
    assert storage.runs.get("r2")["status"] == "aborted"

    class Cancelled(Exception):
        code = "ABORTED"

    with pytest.raises(Cancelled):  # as Better Agent: the ABORTED code makes it aborted; it propagates
        with storage.runs.track("r3", "support"):
            raise Cancelled("stop")
    assert storage.runs.get("r3")["status"] == "aborted"
    assert not issubclass(RunAborted, StorageError)


def test_check_abort_reads_the_stamp_at_most_once_per_interval(storage: Any) -> None:
    with storage.runs.track("r1", "support", abort_check_interval=3600) as run:
        run.check_abort()  # the first call reads: not asked
        storage.runs.request_abort("r1")
        for _ in range(100):
            run.check_abort()  # within the interval: no read, so no raise
    assert storage.runs.get("r1")["status"] == "completed"


class SteppedClock:
    """`time` as tracking.py sees it, with a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_check_abort_raises_once_the_interval_has_passed(storage: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SteppedClock()
    monkeypatch.setattr(tracking, "time", clock)  # only the tracking module's clock: no sleeping
    with storage.runs.track("r1", "support", abort_check_interval=5) as run:
        run.check_abort()  # the first call reads: not asked
        assert storage.runs.request_abort("r1") is AbortRequest.REQUESTED
        clock.now += 4.9
        run.check_abort()  # within the interval: not read yet
        clock.now += 0.1
        with pytest.raises(RunAborted):
            run.check_abort()  # the interval has passed: read, and seen
        with pytest.raises(RunAborted):
            run.check_abort()  # once seen, every call raises
        run.check_abort()  # uncaught: ends the block quietly, as aborted
        raise AssertionError("not reached")
    assert storage.runs.get("r1")["status"] == "aborted"

    # Aborted before the first call: the first call reads, whatever the interval.
    with storage.runs.track("r2", "support", abort_check_interval=3600) as run:
        storage.runs.request_abort("r2")
        run.check_abort()
        raise AssertionError("not reached")
    assert storage.runs.get("r2")["status"] == "aborted"


def test_the_default_heartbeat_beats_once_its_interval_has_passed(storage: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SteppedClock()
    monkeypatch.setattr(tracking, "time", clock)
    with storage.runs.track("r1", "support", thread_id="t1", abort_check_interval=3600) as run:
        for beat in (lambda: run.emit({"type": "CUSTOM"}), run.check_abort,
                     lambda: run.append_messages([{"role": "assistant", "content": "still here"}])):
            old = _silent_since(storage, "r1", hours=3)
            clock.now += tracking.HEARTBEAT_INTERVAL - 1
            beat()  # within the interval: no write
            assert storage.runs.get("r1")["updatedAt"] == old
            clock.now += 1
            beat()  # the interval has passed: one UPDATE
            assert storage.runs.get("r1")["updatedAt"] > old + 3_600_000
    assert storage.runs.get("r1")["status"] == "completed"


def test_a_queued_run_aborted_before_its_worker_starts(storage: Any) -> None:
    run = storage.runs.track("r1", "support", thread_id="t1", messages=[{"role": "user", "content": "Hi"}])
    run.start()  # the web request: visible and followable now
    assert storage.runs.get("r1")["status"] == "running" and storage.streams.get("r1")["status"] == "open"
    assert storage.runs.request_abort("r1")
    done: List[str] = []

    def worker() -> None:
        with run:
            run.check_abort()
            done.append("step 1")
        done.append("moved on")
        storage.database.close()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert done == ["moved on"]
    assert storage.runs.get("r1")["status"] == "aborted"
    with pytest.raises(ConflictError, match="already started"):
        run.start()
    with pytest.raises(ConflictError, match="has already ended"):
        run.__enter__()


def test_finish_with_a_result_or_interrupts(storage: Any) -> None:
    result = {"finishReason": "stop", "usage": {"inputTokens": 3}, "stepCount": 1}
    with storage.runs.track("r1", "support", thread_id="t1") as run:
        final = run.finish(result)
        with pytest.raises(ConflictError, match="has ended"):
            run.emit({"type": "CUSTOM"})
        run.check_abort()  # over: nothing to check
    rec = storage.runs.get("r1")
    assert rec["status"] == "completed" and rec["finalEvent"] == final and final["result"] == result
    assert [e["event"]["type"] for e in events(storage, "r1")].count("RUN_FINISHED") == 1

    interrupts = [{"id": "i1", "reason": "approval", "toolCallId": "c1"}]
    with storage.runs.track("r2", "support", thread_id="t1") as run:
        run.finish(interrupts=interrupts)
    rec = storage.runs.get("r2")
    assert rec["status"] == "interrupted"
    assert rec["finalEvent"]["outcome"] == "interrupt" and rec["finalEvent"]["interrupts"] == interrupts
    # What Better Agent's resume reads (getInterruptedRunInterrupts): RUN_FINISHED, outcome interrupt.
    assert rec["finalEvent"]["type"] == "RUN_FINISHED" and rec["finalEvent"]["runId"] == "r2"

    with storage.runs.track("r3", "support") as run:
        with pytest.raises(ValueError, match="non-empty"):
            run.finish(interrupts=[])
        with pytest.raises(ValueError, match="not a result"):
            run.finish({"x": 1}, interrupts=interrupts)
        with pytest.raises(ValueError, match="ends the run"):
            run.emit({"type": "RUN_FINISHED"})
    assert storage.runs.get("r3")["status"] == "completed"


def test_entry_refuses_a_running_id_and_writes_nothing_on_bad_input(storage: Any) -> None:
    storage.runs.start("busy", "support")
    before = snapshot(storage.database)
    with pytest.raises(ConflictError, match="already running"):
        with storage.runs.track("busy", "support", thread_id="t1",
                                messages=[{"role": "user", "content": "x"}]):
            pytest.fail("the block must not run")
    with pytest.raises(RecordError, match=r"messages\[1\]"):
        with storage.runs.track("new", "support", thread_id="t1",
                                messages=[{"role": "user", "content": "ok"}, {"role": 7}]):
            pytest.fail("the block must not run")
    with pytest.raises(RecordError, match="config"):
        storage.runs.track("new", "support", thread_id="t1", config={"x": float("nan")}).start()
    with pytest.raises(RecordError, match="runId"):
        storage.runs.track("", "support")
    with pytest.raises(RecordError, match="list of message dicts"):
        storage.runs.track("new", "support", thread_id="t1",
                           messages={"role": "user"})  # type: ignore[arg-type]
    assert snapshot(storage.database) == before


def test_a_finished_id_is_started_over(storage: Any) -> None:
    with storage.runs.track("r1", "support") as run:
        for i in range(5):
            run.emit({"type": "CUSTOM", "value": i})
    with storage.runs.track("r1", "support", config={"again": True}) as run:
        run.emit({"type": "CUSTOM", "value": "second"})
    stored = events(storage, "r1")
    assert [e["seq"] for e in stored] == [1, 2, 3]
    assert [e["event"]["type"] for e in stored] == ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]
    rec = storage.runs.get("r1")
    assert rec["config"] == {"again": True} and rec["status"] == "completed"


def test_a_run_reaped_during_its_block(storage: Any, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConflictError, match="had already ended .failed"):
        with storage.runs.track("r1", "support") as run:
            run.emit({"type": "CUSTOM"})
            assert reap_stale(storage, timedelta(0), now_ms=now_ms() + 1000) == 1  # the worker looked dead
    rec = storage.runs.get("r1")
    assert rec["status"] == "failed" and rec["finalEvent"]["code"] == "STALE_RUN"
    assert [e["event"].get("code") for e in events(storage, "r1")][-1] == "STALE_RUN"

    with caplog.at_level(logging.WARNING, logger="better_agent_peewee.tracking"):
        with pytest.raises(ZeroDivisionError):  # the block's own exception still propagates
            with storage.runs.track("r2", "support"):
                reap_stale(storage, timedelta(0), now_ms=now_ms() + 1000)
                1 / 0  # noqa: B018
    assert storage.runs.get("r2")["finalEvent"]["code"] == "STALE_RUN"
    assert "already been ended elsewhere" in caplog.text


@pytest.mark.parametrize("ended_by", ["reap_stale", "another writer"])
def test_a_run_ended_elsewhere_appends_no_messages(storage: Any, ended_by: str) -> None:
    with storage.runs.track("r1", "support", thread_id="t1",
                            messages=[{"id": "q1", "role": "user", "content": "Hi"}]) as run:
        run.append_messages([{"id": "a1", "role": "assistant", "content": "Hello"}])
        if ended_by == "reap_stale":  # its worker looked dead
            assert reap_stale(storage, timedelta(0), now_ms=now_ms() + 1000) == 1
        else:  # aborted and finished by another process
            assert storage.runs.finish("r1", "aborted", {"type": "RUN_ERROR", "code": "ABORTED",
                                                         "message": "stopped by an operator"})
        with pytest.raises(RunEndedElsewhere, match="'r1' was ended elsewhere") as ended:
            run.append_messages([{"id": "a2", "role": "assistant", "content": "written by a dead worker"}])
        assert ended.value.status == ("failed" if ended_by == "reap_stale" else "aborted")
        run.append_messages([{"id": "a3", "role": "assistant", "content": "still here"}])  # raises again
        raise AssertionError("not reached")
    assert [m["id"] for m in storage.memory.messages.list("t1")] == ["q1", "a1"]
    assert [m["id"] for m in run.messages] == ["a1"]
    assert storage.runs.get("r1")["status"] == ended.value.status  # the first outcome stays


def test_append_messages_waits_for_an_end_being_committed(storage: Any) -> None:
    # The end commits while the append waits for the run's row (on SQLite: for the write lock), so
    # the append sees the run ended: reading the status without the lock, it would see `running`.
    ending, errors = threading.Event(), []

    def end_elsewhere() -> None:
        try:
            with storage.transaction():
                final = {"type": "RUN_ERROR", "message": "ended elsewhere"}
                assert storage.runs.finish("r1", "failed", final)
                ending.set()
                time.sleep(0.3)  # the worker's append is waiting meanwhile
        except BaseException as exc:
            errors.append(exc)
            ending.set()
        finally:
            storage.database.close()

    with storage.runs.track("r1", "support", thread_id="t1") as run:
        ender = threading.Thread(target=end_elsewhere)
        ender.start()
        assert ending.wait(timeout=60) and errors == []
        with pytest.raises(RunEndedElsewhere):
            run.append_messages([{"id": "a1", "role": "assistant", "content": "too late"}])
        ender.join(timeout=60)
    assert errors == [] and storage.memory.messages.list("t1") == []
    assert storage.runs.get("r1")["finalEvent"]["message"] == "ended elsewhere"


def _starting_together(storage: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Barrier:
    """A barrier the starts of two runs (in two threads) wait at once each has read its thread,
    so both read "no such thread" before either creates it. SQLite has one writer at a time (the
    start's transaction holds it), so there the starts cannot interleave and nobody waits."""
    barrier = threading.Barrier(1 if storage.dialect.single_writer else 2)
    waited: set = set()
    read = storage.memory.threads.get

    def read_then_wait(thread_id: str) -> Any:
        found = read(thread_id)
        if threading.get_ident() not in waited and threading.current_thread() is not threading.main_thread():
            waited.add(threading.get_ident())
            barrier.wait(timeout=60)
        return found

    monkeypatch.setattr(storage.memory.threads, "get", read_then_wait)
    return barrier


@pytest.mark.parametrize("second_scope", ["subject:bob", None])
def test_two_runs_creating_one_new_thread(storage: Any, monkeypatch: pytest.MonkeyPatch,
                                          second_scope: Any) -> None:
    barrier = _starting_together(storage, monkeypatch)
    racers = {"alpha": "subject:alice", "beta": second_scope}
    outcome: Dict[str, Any] = {}

    def start(agent: str) -> None:
        try:
            with storage.runs.track(f"run-{agent}", agent, thread_id="t1", scope=racers[agent],
                                    state={"by": agent}, messages=[{"id": f"q-{agent}", "role": "user"}]):
                pass
            outcome[agent] = "completed"
        except BaseException as exc:
            outcome[agent] = exc
            barrier.abort()
        finally:
            storage.database.close()

    threads = [threading.Thread(target=start, args=(agent,)) for agent in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    thread = storage.memory.threads.get("t1")
    winner = thread["agentName"]
    loser = "beta" if winner == "alpha" else "alpha"
    # The thread is the winner's, as it created it: never overwritten by the other start.
    assert outcome[winner] == "completed"
    assert thread.get("scope") == racers[winner]
    assert thread["createdAt"] == storage.runs.get(f"run-{winner}")["startedAt"]
    messages = [m["id"] for m in storage.memory.messages.list("t1")]
    if second_scope is not None:  # the loser is checked like any run on an existing thread: refused
        assert isinstance(outcome[loser], NotFoundError), outcome
        assert f"in scope {racers[loser]!r}: thread 't1' not found in that scope" in str(outcome[loser])
        assert storage.runs.get(f"run-{loser}") is None and messages == [f"q-{winner}"]
        assert storage.get("streams", f"run-{loser}") is None
        assert thread["state"] == {"by": winner}
    else:  # the loser runs on the winner's thread (without a scope of its own, in the thread's)
        assert outcome[loser] == "completed", outcome
        assert storage.runs.get(f"run-{loser}").get("scope") == (racers[loser] or thread.get("scope"))
        assert thread["state"] == {"by": loser}  # its input state, written over the thread's
        assert sorted(messages) == sorted(["q-alpha", "q-beta"])


def test_check_abort_names_where_the_run_stopped(storage: Any) -> None:
    # As Better Agent's checkAbort(message): the RUN_ERROR says where the run stopped.
    with storage.runs.track("r1", "support") as run:
        storage.runs.request_abort("r1")
        with pytest.raises(RunAborted, match="^Run aborted after model generation.$"):
            run.check_abort("Run aborted after model generation.")
        run.check_abort("Run aborted after tool execution.")
    final = storage.runs.get("r1")["finalEvent"]
    assert final["message"] == "Run aborted after tool execution." and final["code"] == "ABORTED"
    assert events(storage, "r1")[-1]["event"]["message"] == "Run aborted after tool execution."
    with storage.runs.track("r2", "support") as run:  # without a message: the default one
        storage.runs.request_abort("r2")
        run.check_abort()
    assert storage.runs.get("r2")["finalEvent"]["message"] == "run 'r2' was aborted on request"


def _silent_since(storage: Any, run_id: str, hours: int) -> int:
    """Set the run's updatedAt `hours` back, as if its last write were that old; the stamp."""
    stamp = now_ms() - hours * 3_600_000
    R = storage.models.run
    assert R.update(updated_at=stamp).where(R.run_id == run_id).execute() == 1
    return stamp


def test_a_live_run_beats_and_is_not_reaped(storage: Any) -> None:
    with storage.runs.track("r1", "support", thread_id="t1", heartbeat_interval=0) as run:
        run.emit({"type": "CUSTOM"})
        # Each call that beats, made after the run has run for longer than stale_after.
        for beat in (lambda: run.emit({"type": "CUSTOM"}), run.check_abort,
                     lambda: run.append_messages([{"role": "assistant", "content": "still here"}])):
            old = _silent_since(storage, "r1", hours=3)
            beat()
            assert storage.runs.get("r1")["updatedAt"] > old + 3_600_000
            assert reap_stale(storage, timedelta(hours=2)) == 0
        assert run.emit({"type": "CUSTOM"}) == 4  # not refused: the run was never reaped
    assert storage.runs.get("r1")["status"] == "completed"

    # A throttled heartbeat writes nothing within its interval: a run silent for longer than
    # stale_after in between is reaped (the block then says so).
    with pytest.raises(ConflictError, match="had already ended .failed"):
        with storage.runs.track("r2", "support", heartbeat_interval=3600) as run:
            old = _silent_since(storage, "r2", hours=3)
            run.emit({"type": "CUSTOM"})
            run.check_abort()
            assert storage.runs.get("r2")["updatedAt"] == old
            assert run.heartbeat() is True  # by hand, e.g. inside a long silent step
            assert reap_stale(storage, timedelta(hours=2)) == 0
            _silent_since(storage, "r2", hours=3)
            assert reap_stale(storage, timedelta(hours=2)) == 1
            assert run.heartbeat() is False and storage.runs.heartbeat("r2") is False
    assert storage.runs.heartbeat("no-such-run") is False
    for bad in (-1, float("nan"), "60", True):
        with pytest.raises(ValueError, match="heartbeat_interval must be a non-negative number"):
            storage.runs.track("r3", "support", heartbeat_interval=bad)
    assert storage.runs.get("r3") is None


def test_two_workers_racing_for_one_id(storage: Any) -> None:
    rounds, racers = 6, 3
    barrier = threading.Barrier(racers)
    wins: List[List[int]] = [[] for _ in range(rounds)]
    errors: List[BaseException] = []

    def racer(n: int) -> None:
        try:
            storage.database.connect(reuse_if_open=True)
            for round_ in range(rounds):
                barrier.wait(timeout=60)
                try:
                    with storage.runs.track(f"race-{round_}", f"agent-{n}") as run:
                        run.emit({"type": "CUSTOM", "by": n})
                        barrier.wait(timeout=60)  # everyone has tried while the winner runs
                except ConflictError:
                    barrier.wait(timeout=60)
                    continue
                wins[round_].append(n)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            storage.database.close()

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    for round_ in range(rounds):
        assert len(wins[round_]) == 1
        rec = storage.runs.get(f"race-{round_}")
        assert rec["status"] == "completed" and rec["agentName"] == f"agent-{wins[round_][0]}"
        assert [e["event"]["type"] for e in events(storage, f"race-{round_}")] == \
            ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]


def test_many_runs_on_one_thread_at_once(storage: Any) -> None:
    workers, runs_each, tokens = 4, 5, 10
    errors: List[BaseException] = []

    def worker(n: int) -> None:
        try:
            for k in range(runs_each):
                rid = f"w{n}-r{k}"
                with storage.runs.track(rid, "chat", thread_id="shared",
                                        messages=[{"id": f"{rid}-q", "role": "user", "content": rid}]) as run:
                    for t in range(tokens):
                        run.check_abort()
                        run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": f"{rid}-a", "delta": str(t)})
                    run.append_messages([{"id": f"{rid}-a", "role": "assistant", "content": "done"}])
        except BaseException as exc:
            errors.append(exc)
        finally:
            storage.database.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    runs = storage.list("runs")["items"]
    assert len(runs) == workers * runs_each and {r["status"] for r in runs} == {"completed"}
    for r in runs:
        assert [e["seq"] for e in events(storage, r["runId"])] == list(range(1, tokens + 3))
    messages = storage.memory.messages.list("shared")
    assert len(messages) == 2 * workers * runs_each
    assert storage.memory.threads.get("shared")["updatedAt"] >= max(r["finishedAt"] for r in runs)


def test_threads_touch_changes_only_updated_at(storage: Any) -> None:
    thread = {"id": "t1", "agentName": "a", "title": "T", "state": {"s": 1}, "createdAt": 1, "updatedAt": 2}
    storage.memory.threads.set("t1", thread)
    storage.memory.threads.touch("t1", 5_000)
    assert storage.memory.threads.get("t1") == {**thread, "updatedAt": 5_000}
    storage.memory.threads.touch("missing", 5_000)  # nothing to bump
    assert storage.memory.threads.get("missing") is None
    with pytest.raises(RecordError, match="updatedAt"):
        storage.memory.threads.touch("t1", "soon")  # type: ignore[arg-type]


WORKER = """
import sys
from better_agent_peewee import peewee_storage
from better_agent_peewee.cli import open_database

storage = peewee_storage(open_database(sys.argv[1]))
with storage.runs.track("doomed", "worker", thread_id="t1",
                        messages=[{"role": "user", "content": "hi"}]) as run:
    for k in range(3):
        run.emit({"type": "CUSTOM", "k": k})
    print("streamed", flush=True)
    sys.stdin.readline()  # killed while it waits here
"""


def test_a_killed_worker_leaves_what_reap_stale_cleans_up(storage: Any, database_url: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, database_url], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "streamed\n", line + proc.stdout.read()
        proc.kill()  # SIGKILL inside the block: nothing of the end is written
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -9
    assert storage.runs.get("doomed")["status"] == "running" \
        and storage.streams.get("doomed")["status"] == "open"
    assert reap_stale(storage, timedelta(minutes=5), now_ms=now_ms() + 10 * 60_000) == 1
    rec = storage.runs.get("doomed")
    assert rec["status"] == "failed" and rec["finalEvent"]["code"] == "STALE_RUN"
    followed = list(storage.streams.resume("doomed", 0, timeout=10))
    assert [e["type"] for e in followed] == ["RUN_STARTED", "CUSTOM", "CUSTOM", "CUSTOM", "RUN_ERROR"]
    assert {k: v for k, v in followed[-1].items() if k != "seq"} == rec["finalEvent"]
    assert storage.streams.get("doomed")["status"] == "closed"
