"""A database a person would inspect: two agents, a conversation with tool calls, runs of every
status over the last week, a live run and a stale one, and hostile strings everywhere a stored
string is shown. Not a test module: tests/test_inspector*.py and bench/inspector.py use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

import peewee

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.inspector import inspector_app, make_inspector_server

#: Stored strings that would run script if a page put them in as markup (each sets window.__pwned).
HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '<img src="x" onerror="window.__pwned = 2">',
    "javascript:window.__pwned = 3",
    '"><svg onload="window.__pwned = 4">',
]
MINUTE = 60_000
HOUR = 60 * MINUTE
STATUSES = ("completed", "completed", "completed", "failed", "completed", "aborted", "interrupted")


def seed(storage: Any, now_ms: int = 0, hostile: bool = True) -> Dict[str, Any]:
    """Fill `storage`; returns the ids the tests look for. `hostile`: with the hostile strings."""
    now = now_ms or int(time.time() * 1000)
    with storage.transaction():  # one commit: a thousand rows in a blink on every dialect
        _fill(storage, now, hostile)
    return {
        "thread": "trip-to-lisbon",
        "live": "run-live",
        "stale": "run-stale",
        "hostile_agent": HOSTILE[1],
        "failed": "run-trip-2",
    }


def _fill(storage: Any, now: int, hostile: bool) -> None:
    _conversation(storage, now)
    if hostile:
        _hostile(storage, now)
    for i in range(40):
        storage.set(
            "memoryThreads",
            f"support-{i:03d}",
            {
                "id": f"support-{i:03d}",
                "agentName": "support",
                "title": f"Refund for order {1000 + i}",
                "createdAt": now - (i + 2) * HOUR,
                "updatedAt": now - (i + 1) * HOUR,
            },
        )
    for i in range(120):  # a week of runs, one about every 83 minutes, every status
        status = STATUSES[i % len(STATUSES)]
        started = now - i * 83 * MINUTE - 5 * MINUTE
        agent = ("support", "planner")[i % 2]
        _run(
            storage,
            f"run-{i:04d}",
            agent,
            f"support-{i % 40:03d}" if agent == "support" else None,
            status,
            started,
            started + (2 + i % 9) * 1000 + (i % 4) * 15000,
        )
    # Running: one live (updated just now) and one whose worker looks gone (silent for an hour).
    _run(storage, "run-live", "planner", None, "running", now - 2 * MINUTE, None, updated=now)
    _run(storage, "run-stale", "support", "support-001", "running", now - 3 * HOUR, None, updated=now - HOUR)


def _hostile(storage: Any, now: int) -> None:
    """Hostile strings as a thread title, state, message, agent name, error and event payloads."""
    agent = HOSTILE[1]
    for i, title in enumerate(HOSTILE):
        storage.set(
            "memoryThreads",
            f"evil-{i}",
            {
                "id": f"evil-{i}",
                "agentName": agent,
                "title": title,
                "state": {"note": title},
                "createdAt": now - 9 * HOUR,
                "updatedAt": now - 9 * HOUR + i,
            },
        )
        storage.set(
            "memoryMessages",
            f"evil-{i}:{now - 9 * HOUR}:e{i}",
            {
                "id": f"e{i}",
                "threadId": f"evil-{i}",
                "role": "user",
                "content": title,
                "createdAt": now - 9 * HOUR,
            },
        )
    _run(
        storage,
        "run-hostile",
        agent,
        "evil-0",
        "failed",
        now - 8 * HOUR,
        now - 8 * HOUR + 3000,
        message=HOSTILE[0],
        extra_events=[{"type": "TEXT_MESSAGE_CONTENT", "messageId": "x", "delta": h} for h in HOSTILE],
    )


def _conversation(storage: Any, now: int) -> None:
    t0 = now - 30 * MINUTE
    storage.set(
        "memoryThreads",
        "trip-to-lisbon",
        {
            "id": "trip-to-lisbon",
            "agentName": "support",
            "title": "Trip to Lisbon",
            "scope": "subject:alice",
            "state": {"destination": "Lisbon", "nights": 3, "budget": {"currency": "EUR", "max": 600}},
            "metadata": {"channel": "web"},
            "createdAt": t0,
            "updatedAt": t0 + 9000,
        },
    )
    messages: List[Dict[str, Any]] = [
        {
            "id": "m1",
            "role": "user",
            "content": "Find me a hotel in Lisbon for 3 nights under 600 EUR.",
            "runId": "run-trip-1",
        },
        {
            "id": "m2",
            "role": "assistant",
            "content": "",
            "runId": "run-trip-1",
            "toolCalls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {
                        "name": "search_hotels",
                        "arguments": '{"city":"Lisbon","nights":3,"max":600}',
                    },
                }
            ],
        },
        {
            "id": "m3",
            "role": "tool",
            "toolCallId": "call-1",
            "runId": "run-trip-1",
            "content": '[{"name":"Casa do Rio","price":540},{"name":"Alfama Rooms","price":480}]',
        },
        {
            "id": "m4",
            "role": "assistant",
            "runId": "run-trip-1",
            "content": "Alfama Rooms: 480 EUR for 3 nights. Casa do Rio: 540 EUR. Shall I book one?",
        },
        {"id": "m5", "role": "user", "content": "Book Alfama Rooms.", "runId": "run-trip-2"},
    ]
    for i, message in enumerate(messages):
        created = t0 + i * 2000 + (1000 if i == 4 else 0)
        storage.set(
            "memoryMessages",
            f"trip-to-lisbon:{created}:{message['id']}",
            {**message, "threadId": "trip-to-lisbon", "createdAt": created},
        )
    _run(storage, "run-trip-1", "support", "trip-to-lisbon", "completed", t0, t0 + 7000)
    _run(
        storage,
        "run-trip-2",
        "support",
        "trip-to-lisbon",
        "failed",
        t0 + 8500,
        t0 + 9000,
        message="booking API answered 503",
    )


def _run(
    storage: Any,
    run_id: str,
    agent: str,
    thread_id: Any,
    status: str,
    started: int,
    finished: Any,
    *,
    updated: Any = None,
    message: str = "model error",
    extra_events: Any = (),
) -> None:
    final: Any = None
    if status == "completed":
        final = {"type": "RUN_FINISHED", "runId": run_id, "timestamp": finished}
    elif status in ("failed", "aborted"):
        final = {
            "type": "RUN_ERROR",
            "message": message,
            "timestamp": finished,
            "code": "ABORTED" if status == "aborted" else "AGENT_ERROR",
        }
    elif status == "interrupted":
        final = {"type": "RUN_FINISHED", "runId": run_id, "outcome": "interrupt", "timestamp": finished}
    record: Dict[str, Any] = {
        "runId": run_id,
        "agentName": agent,
        "status": status,
        "config": {"model": "m-1"},
        "startedAt": started,
        "updatedAt": updated or finished or started,
    }
    if thread_id:
        record["threadId"] = thread_id
    if final is not None:
        record.update(finalEvent=final, finishedAt=finished)
    storage.set("runs", run_id, record)
    storage.set(
        "streams",
        run_id,
        {
            "runId": run_id,
            "status": "open" if status == "running" else "closed",
            "createdAt": started,
            "updatedAt": started,
        },
    )
    events = [
        {"type": "RUN_STARTED", "runId": run_id, "threadId": thread_id or ""},
        {"type": "TEXT_MESSAGE_START", "messageId": f"{run_id}-m", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": f"{run_id}-m", "delta": "Looking that up"},
        {"type": "TOOL_CALL_START", "toolCallId": "call-1", "toolCallName": "search_hotels"},
        {"type": "TOOL_CALL_END", "toolCallId": "call-1"},
        *extra_events,
    ]
    if final is not None:
        events.append(final)
    for seq, event in enumerate(events, 1):
        stamp = started + seq * 350
        storage.set(
            "streamEvents",
            f"{run_id}:{seq}",
            {
                "id": f"{run_id}:{seq}",
                "runId": run_id,
                "seq": seq,
                "timestamp": stamp,
                "event": {**event, "timestamp": stamp},
            },
        )


def screenshot(out: str) -> None:
    """``python -m tests.inspector_seed docs/inspector-overview.png``: the README's picture, of the
    seeded database without the hostile strings, taken by headless chromium."""
    with tempfile.TemporaryDirectory() as tmp:
        db = peewee.SqliteDatabase(os.path.join(tmp, "demo.db"))
        create_tables(db)
        storage = peewee_storage(db)
        seed(storage, hostile=False)
        server = make_inspector_server(inspector_app(storage), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            subprocess.run(
                [
                    "chromium",
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--user-data-dir={tmp}/profile",
                    "--window-size=1200,1180",
                    f"--screenshot={os.path.abspath(out)}",
                    f"http://127.0.0.1:{server.server_port}/",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        finally:
            server.shutdown()


if __name__ == "__main__":
    screenshot(sys.argv[1])
