"""storage.agent(name, scope): agent-scoped run control, as Better Agent's app.agent(name)."""
from __future__ import annotations

from typing import Any, Dict

import peewee
import pytest

from better_agent_peewee import AbortRequest, NotFoundError, RecordError, create_tables, peewee_storage

T0 = 1_700_000_000_000


@pytest.fixture
def storage(database: peewee.Database) -> Any:
    create_tables(database)
    return peewee_storage(database)


def put_run(storage: Any, run_id: str, agent: str = "support", started: int = T0,
            **fields: Any) -> Dict[str, Any]:
    rec = {"runId": run_id, "agentName": agent, "status": "running", "config": None,
           "startedAt": started, "updatedAt": started}
    rec.update(fields)
    storage.set("runs", run_id, rec)
    return rec


def not_found_text(call: Any) -> str:
    with pytest.raises(NotFoundError) as caught:
        call()
    return str(caught.value)


def test_running_is_the_latest_running_run_of_the_agent_in_the_scope(storage: Any) -> None:
    put_run(storage, "old", started=T0)
    put_run(storage, "new", started=T0 + 5, scope="u1")
    put_run(storage, "done", started=T0 + 9, status="completed")
    put_run(storage, "other", agent="sales", started=T0 + 10)
    put_run(storage, "u2-run", started=T0 + 3, scope="u2")
    assert storage.agent("support").running()["runId"] == "new"
    assert storage.agent("support", scope="u2").running()["runId"] == "u2-run"
    assert storage.agent("support", scope="u3").running() is None
    assert storage.agent("nobody").running() is None


def test_abort_without_a_run_id_stamps_the_latest_running_run(storage: Any) -> None:
    put_run(storage, "old", started=T0)
    put_run(storage, "new", started=T0 + 5)
    handle = storage.agent("support")
    assert handle.abort() is AbortRequest.REQUESTED
    assert storage.runs.abort_requested("new") and not storage.runs.abort_requested("old")
    # The latest running run is still "new" (asked, not yet stopped): asked once only.
    assert handle.abort() is AbortRequest.ALREADY_REQUESTED
    assert handle.abort("old") is AbortRequest.REQUESTED


def test_without_a_running_run_the_error_names_the_agent_and_scope(storage: Any) -> None:
    put_run(storage, "done", status="completed")
    text = not_found_text(lambda: storage.agent("support", scope="u1").abort())
    assert "'support'" in text and "'u1'" in text
    text = not_found_text(lambda: storage.agent("support").resume())
    assert "'support'" in text
    assert storage.runs.get("done")["status"] == "completed"
    assert not storage.runs.abort_requested("done")


def test_a_run_of_another_agent_or_scope_is_not_found_exactly_as_a_missing_one(storage: Any) -> None:
    put_run(storage, "theirs", agent="sales")
    put_run(storage, "scoped", scope="u2")
    handle = storage.agent("support")
    missing = not_found_text(lambda: handle.abort("theirs-missing"))
    other = not_found_text(lambda: handle.abort("theirs"))
    assert other == missing.replace("theirs-missing", "theirs")
    assert not storage.runs.abort_requested("theirs")
    scoped = storage.agent("support", scope="u1")
    assert not_found_text(lambda: scoped.abort("scoped")) == missing.replace("theirs-missing", "scoped")
    assert not storage.runs.abort_requested("scoped")
    # resume answers the same way for a missing run, another agent's, another scope's.
    gone = not_found_text(lambda: handle.resume("nope"))
    assert not_found_text(lambda: handle.resume("theirs")) == gone.replace("nope", "theirs")
    assert not_found_text(lambda: scoped.resume("scoped")) == gone.replace("nope", "scoped")
    # Without a scope, any scope; with one, that scope: the run is found.
    assert handle.abort("scoped") is AbortRequest.REQUESTED


def test_a_run_without_a_scope_answers_a_scoped_caller_as_better_agent_does(storage: Any) -> None:
    # Better Agent's run access check lets any caller act on a run that has no scope.
    put_run(storage, "unscoped")
    assert storage.agent("support", scope="u1").abort("unscoped") is AbortRequest.REQUESTED
    # ... but the lookup without a run id finds only runs in the scope.
    assert storage.agent("support", scope="u1").running() is None


def test_abort_answers_as_request_abort_does(storage: Any) -> None:
    put_run(storage, "r1")
    put_run(storage, "r2", status="failed", finishedAt=T0 + 1)
    handle = storage.agent("support")
    assert handle.abort("r1") is AbortRequest.REQUESTED
    assert handle.abort("r1") is AbortRequest.ALREADY_REQUESTED
    assert handle.abort("r2") is AbortRequest.NOT_RUNNING
    with pytest.raises(RecordError):
        handle.abort("")


def test_a_run_that_ends_between_the_lookup_and_the_abort_is_not_running(storage: Any) -> None:
    put_run(storage, "r1")
    lookup = storage.runs.running

    def lookup_then_the_run_ends(agent: str, scope: Any = None) -> Any:
        found = lookup(agent, scope)
        storage.runs.finish("r1", "completed", {"type": "RUN_FINISHED", "threadId": "", "runId": "r1"})
        return found

    storage.runs.running = lookup_then_the_run_ends
    assert storage.agent("support").abort() is AbortRequest.NOT_RUNNING
    run = storage.runs.get("r1")
    assert run["status"] == "completed" and "abortRequestedAt" not in run


def test_a_run_id_taken_over_by_another_agent_after_the_lookup_is_not_stamped(storage: Any) -> None:
    put_run(storage, "r1")
    lookup = storage.runs.running

    def lookup_then_taken_over(agent: str, scope: Any = None) -> Any:
        found = lookup(agent, scope)
        put_run(storage, "r1", agent="sales")  # the id started over by another agent
        return found

    storage.runs.running = lookup_then_taken_over
    with pytest.raises(NotFoundError):
        storage.agent("support").abort()
    assert not storage.runs.abort_requested("r1")


def test_resume_follows_the_latest_running_run_or_the_given_one(storage: Any) -> None:
    for run_id, started in (("r1", T0), ("r2", T0 + 1)):
        put_run(storage, run_id, started=started)
        storage.streams.open(run_id)
        storage.streams.append(run_id, {"type": "RUN_STARTED", "runId": run_id})
        storage.streams.append(run_id, {"type": "TEXT_MESSAGE_CONTENT", "delta": run_id})
        storage.streams.close(run_id)
    handle = storage.agent("support")
    with handle.resume(timeout=10) as follower:
        assert [(e["seq"], e.get("runId", e.get("delta"))) for e in follower] == [(1, "r2"), (2, "r2")]
        assert follower.reason == "closed"
    with handle.resume("r1", after_seq=1, timeout=10) as follower:
        assert [e["delta"] for e in follower] == ["r1"]
    with pytest.raises(ValueError):
        handle.resume("r1", after_seq=-1)


def test_bad_names_are_refused(storage: Any) -> None:
    for bad in ("", None, 5):
        with pytest.raises(RecordError):
            storage.agent(bad)
    with pytest.raises(RecordError):
        storage.agent("support", scope="")
