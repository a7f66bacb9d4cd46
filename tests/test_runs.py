"""storage.runs: start, finish, abort and the lookups of "Runs" in docs/contract.md."""
from __future__ import annotations

import datetime as dt
import threading
from typing import Any, Callable, Dict, List

import peewee
import pytest

from better_agent_peewee import (
    AbortRequest,
    ConflictError,
    NotFoundError,
    RecordError,
    create_tables,
    peewee_storage,
)
from better_agent_peewee.records import now_ms
from tests.samples import snapshot

T0 = 1_700_000_000_000
FINISHED = {"type": "RUN_FINISHED", "threadId": "t1", "runId": "r1", "outcome": "success",
            "result": {"finishReason": "stop", "stepCount": 2}}
FAILED = {"type": "RUN_ERROR", "message": "model unavailable", "code": "PROVIDER_ERROR"}


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def put_run(storage: Any, run_id: str, **fields: Any) -> Dict[str, Any]:
    rec = {"runId": run_id, "agentName": "agent", "status": "running", "config": None,
           "startedAt": T0, "updatedAt": T0}
    rec.update(fields)
    storage.set("runs", run_id, rec)
    return rec


def test_start_writes_the_running_record_better_agent_writes(storage: Any) -> None:
    before = now_ms()
    rec = storage.runs.start("r1", "agent", thread_id="t1", scope="user-7",
                             config={"context": {"tz": "UTC"}, "maxSteps": 5})
    after = now_ms()
    assert rec == {"runId": "r1", "agentName": "agent", "threadId": "t1", "scope": "user-7",
                   "status": "running", "config": {"context": {"tz": "UTC"}, "maxSteps": 5},
                   "startedAt": rec["startedAt"], "updatedAt": rec["startedAt"]}
    assert before <= rec["startedAt"] <= after
    assert storage.runs.get("r1") == rec
    assert storage.get("runs", "r1") == rec

    bare = storage.runs.start("r2", "agent")
    assert storage.runs.get("r2") == bare
    assert set(bare) == {"runId", "agentName", "status", "config", "startedAt", "updatedAt"}
    assert bare["config"] is None
    assert storage.runs.get("missing") is None


@pytest.mark.parametrize("status,final", [("completed", FINISHED), ("interrupted", FINISHED),
                                          ("failed", FAILED), ("aborted", FAILED)])
def test_finish_records_the_end_of_a_run(storage: Any, status: str, final: Dict[str, Any]) -> None:
    put_run(storage, "r1", threadId="t1", abortRequestedAt=T0 + 5)
    before = now_ms()
    storage.runs.finish("r1", status, final)
    after = now_ms()
    rec = storage.runs.get("r1")
    assert before <= rec["finishedAt"] <= after
    assert rec == {"runId": "r1", "agentName": "agent", "threadId": "t1", "status": status,
                   "abortRequestedAt": T0 + 5, "finalEvent": final, "config": None,
                   "startedAt": T0, "updatedAt": rec["finishedAt"], "finishedAt": rec["finishedAt"]}


def test_finish_without_a_final_event_and_twice(storage: Any) -> None:
    put_run(storage, "r1")
    assert storage.runs.finish("r1", "completed") is True
    rec = storage.runs.get("r1")
    assert rec["status"] == "completed" and "finalEvent" not in rec and "finishedAt" in rec
    assert storage.runs.finish("r1", "completed") is False  # only a running run is finished
    assert storage.runs.get("r1") == rec


def test_finish_refuses_what_better_agent_would_not_write(storage: Any) -> None:
    put_run(storage, "r1")
    before = snapshot(storage.database)
    with pytest.raises(RecordError, match="status"):
        storage.runs.finish("r1", "running")
    with pytest.raises(RecordError, match="status"):
        storage.runs.finish("r1", "done")
    with pytest.raises(RecordError, match="finalEvent"):
        storage.runs.finish("r1", "completed", FAILED)  # completed ends with RUN_FINISHED
    with pytest.raises(RecordError, match="finalEvent"):
        storage.runs.finish("r1", "failed", {"type": "TEXT_MESSAGE_END"})
    with pytest.raises(RecordError, match="finalEvent"):
        storage.runs.finish("r1", "failed", {"type": "RUN_ERROR", "message": "bad \x00"})
    with pytest.raises(NotFoundError, match="nope"):
        storage.runs.finish("nope", "completed", FINISHED)
    assert snapshot(storage.database) == before


def test_request_abort_stamps_a_running_run_once(storage: Any) -> None:
    put_run(storage, "r1")
    before = now_ms()
    assert storage.runs.abort_requested("r1") is False
    assert storage.runs.request_abort("r1") is AbortRequest.REQUESTED
    rec = storage.runs.get("r1")
    assert before <= rec["abortRequestedAt"] == rec["updatedAt"] <= now_ms()
    assert rec["status"] == "running"
    assert storage.runs.abort_requested("r1") is True

    answer = storage.runs.request_abort("r1")  # already asked: nothing changes
    assert answer is AbortRequest.ALREADY_REQUESTED and not answer
    assert storage.runs.get("r1") == rec


def test_request_abort_leaves_finished_runs_alone(storage: Any) -> None:
    put_run(storage, "done", status="completed", finishedAt=T0 + 10, finalEvent=FINISHED)
    before = snapshot(storage.database)
    answer = storage.runs.request_abort("done")
    assert answer is AbortRequest.NOT_RUNNING and not answer and answer == "not_running"
    assert snapshot(storage.database) == before
    assert storage.runs.abort_requested("done") is False


def test_request_abort_of_an_unknown_run_is_not_found(storage: Any) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        storage.runs.request_abort("nope")
    assert storage.runs.abort_requested("nope") is False  # as Better Agent's abort check reads it


RACERS, ROUNDS = 4, 10


def race(storage: Any, call: Callable[[int, int], Any]) -> List[List[Any]]:
    """RACERS threads, each on its own connection, run ``call(racer, round)`` together in every
    round (a barrier starts them at one moment); the results of each round, in finishing order."""
    for round_ in range(ROUNDS):
        put_run(storage, f"race-{round_}")
    barrier = threading.Barrier(RACERS)
    results: List[List[Any]] = [[] for _ in range(ROUNDS)]
    errors: List[BaseException] = []

    def racer(n: int) -> None:
        try:
            storage.database.connect(reuse_if_open=True)  # connected before the start signal
            for round_ in range(ROUNDS):
                barrier.wait(timeout=30)
                results[round_].append(call(n, round_))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            storage.database.close()

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    return results


def test_threads_racing_to_abort_have_exactly_one_winner(storage: Any) -> None:
    results = race(storage, lambda n, round_: storage.runs.request_abort(f"race-{round_}"))
    for round_ in range(ROUNDS):
        expected = [AbortRequest.ALREADY_REQUESTED] * (RACERS - 1) + [AbortRequest.REQUESTED]
        assert sorted(results[round_]) == expected
        assert storage.runs.abort_requested(f"race-{round_}") is True


def test_latest_for_thread_is_the_run_started_last(storage: Any) -> None:
    put_run(storage, "old", threadId="t1", startedAt=T0)
    put_run(storage, "new", threadId="t1", startedAt=T0 + 100, status="interrupted")
    put_run(storage, "other", threadId="t2", startedAt=T0 + 200)
    assert storage.runs.latest_for_thread("t1")["runId"] == "new"
    assert storage.runs.latest_for_thread("t2")["runId"] == "other"
    assert storage.runs.latest_for_thread("t3") is None


def test_running_is_the_agents_latest_running_run(storage: Any) -> None:
    put_run(storage, "a1", startedAt=T0, scope="s1")
    put_run(storage, "a2", startedAt=T0 + 100, scope="s2")
    put_run(storage, "a3", startedAt=T0 + 200, scope="s1", status="completed")
    put_run(storage, "b1", agentName="other", startedAt=T0 + 300)
    assert storage.runs.running("agent")["runId"] == "a2"
    assert storage.runs.running("agent", scope="s1")["runId"] == "a1"
    assert storage.runs.running("agent", scope="s3") is None
    assert storage.runs.running("nobody") is None


def test_prune_and_reap_stale_are_reachable_from_runs(storage: Any) -> None:
    from better_agent_peewee.prune import PruneReport

    assert isinstance(storage.runs.prune(dt.timedelta(days=1)), PruneReport)
    put_run(storage, "stuck", startedAt=T0, updatedAt=T0)
    assert storage.runs.reap_stale(dt.timedelta(hours=1)) == 1
    assert storage.runs.get("stuck")["status"] == "failed"


# -- guards: start refuses an existing id, finish changes only a running run ---------------------

def test_start_refuses_an_existing_id_unless_asked_to_replace(storage: Any) -> None:
    first = storage.runs.start("r1", "agent", thread_id="t1", config={"v": 1})
    storage.runs.finish("r1", "aborted", FAILED)
    before = snapshot(storage.database)
    with pytest.raises(ConflictError, match=r"'r1' already exists \(aborted\).*replace=True"):
        storage.runs.start("r1", "other", config={"v": 2})
    assert snapshot(storage.database) == before
    storage.runs.start("r2", "agent")
    with pytest.raises(ConflictError, match="running"):
        storage.runs.start("r2", "agent")
    again = storage.runs.start("r1", "other", config={"v": 2}, replace=True)
    assert storage.runs.get("r1") == again and again["status"] == "running" and again["config"] == {"v": 2}
    assert "finalEvent" not in again and first["agentName"] == "agent"
    with pytest.raises(RecordError, match="runs.agentName"):  # validated before anything is written
        storage.runs.start("r3", 7)  # type: ignore[arg-type]
    assert storage.runs.get("r3") is None


@pytest.mark.parametrize("ended", ["aborted", "failed", "completed", "interrupted"])
def test_finish_keeps_the_outcome_of_a_run_that_already_ended(storage: Any, ended: str) -> None:
    final = FAILED if ended in ("aborted", "failed") else FINISHED
    put_run(storage, "r1", status=ended, finalEvent=final, finishedAt=T0 + 10, updatedAt=T0 + 10)
    before = snapshot(storage.database)
    assert storage.runs.finish("r1", "completed", FINISHED) is False
    assert storage.runs.finish("r1", "failed", FAILED) is False
    assert snapshot(storage.database) == before


def test_threads_racing_to_finish_have_exactly_one_winner(storage: Any) -> None:
    def finish(n: int, round_: int) -> Any:
        status, final = ("completed", FINISHED) if n % 2 else ("aborted", FAILED)
        return storage.runs.finish(f"race-{round_}", status, final), status

    results = race(storage, finish)
    for round_ in range(ROUNDS):
        winners = [status for won, status in results[round_] if won]
        assert len(winners) == 1
        assert storage.runs.get(f"race-{round_}")["status"] == winners[0]
