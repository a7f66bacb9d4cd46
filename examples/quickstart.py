"""Quickstart: a conversation, a run, and a live event stream, on a SQLite file.

    python examples/quickstart.py                  # ./agent.db
    python examples/quickstart.py /tmp/demo.db     # another SQLite file
    DATABASE_URL=postgresql://app:secret@localhost/app python examples/quickstart.py

What it does, as an agent server would:

1. creates the five tables (safe to repeat);
2. records a conversation thread and the user's message;
3. starts a run, opens its event stream, and streams the assistant's reply as AG-UI
   events while a second thread follows the stream with `resume` (as a browser tab
   would, through your web server);
4. stores the reply as a message, finishes the run, closes the stream;
5. prints what it did, and what the follower saw.

Every run uses new ids, so running it again adds another conversation.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any, Dict, List

from better_agent_peewee import create_tables, open_database, peewee_storage
from better_agent_peewee.database_url import redact


def database_url(argv: List[str]) -> str:
    """The database to use: a path or URL argument, else $DATABASE_URL, else ./agent.db."""
    if len(argv) > 1:
        target = argv[1]
        return target if "://" in target else f"sqlite:///{target}"
    return os.environ.get("DATABASE_URL") or "sqlite:///agent.db"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def main(argv: List[str]) -> int:
    url = database_url(argv)
    db = open_database(url)  # WAL, foreign keys and a busy timeout on SQLite
    create_tables(db)
    storage = peewee_storage(db)

    # 1. A thread and the user's message.
    thread_id = f"thread-{uuid.uuid4().hex[:12]}"
    now = now_ms()
    storage.memory.threads.set(thread_id, {"id": thread_id, "agentName": "assistant", "title": "Quickstart",
                                           "createdAt": now, "updatedAt": now})
    storage.memory.messages.append(thread_id, [{"id": "msg-1", "role": "user", "content": "What is Peewee?"}])

    # 2. A run and its event stream.
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    storage.runs.start(run_id, "assistant", thread_id=thread_id, config={"model": "demo"})
    storage.streams.open(run_id)

    # 3. A follower, on its own thread (and so its own connection), reading the stream live.
    seen: List[Dict[str, Any]] = []

    def follow() -> None:
        try:
            for event in storage.streams.resume(run_id, timeout=30):  # ends when the stream closes
                seen.append(event)
        finally:
            db.close()  # this thread's connection

    follower = threading.Thread(target=follow, name="follower")
    follower.start()

    # 4. The agent streams its reply, one AG-UI event per append (each gets the next seq).
    reply = "Peewee is a small, expressive ORM for Python."
    events: List[Dict[str, Any]] = [
        {"type": "RUN_STARTED", "threadId": thread_id, "runId": run_id},
        {"type": "TEXT_MESSAGE_START", "messageId": "msg-2", "role": "assistant"},
        *({"type": "TEXT_MESSAGE_CONTENT", "messageId": "msg-2", "delta": word + " "}
          for word in reply.split()),
        {"type": "TEXT_MESSAGE_END", "messageId": "msg-2"},
        {"type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id},
    ]
    last_seq = 0
    for event in events:
        last_seq = storage.streams.append(run_id, {**event, "timestamp": now_ms()})

    # 5. The reply joins the conversation; the run ends; the stream closes (the follower stops).
    storage.memory.messages.append(thread_id, [{"id": "msg-2", "role": "assistant", "content": reply}],
                                   run_id=run_id)
    storage.runs.finish(run_id, "completed", {"type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id})
    storage.streams.close(run_id)
    follower.join(timeout=60)

    # What is stored now.
    thread = storage.memory.threads.get(thread_id)
    messages = storage.memory.messages.list(thread_id)
    run = storage.runs.get(run_id)
    stream = storage.streams.get(run_id)
    assert thread is not None and run is not None and stream is not None
    print(f"database:  {redact(url)} ({storage.dialect.name})")
    print(f"thread:    {thread['id']} ({thread['title']!r}, agent {thread['agentName']})")
    for message in messages:
        print(f"  {message['role']:>9}: {message['content']}")
    print(f"run:       {run['runId']} {run['status']} in {run['finishedAt'] - run['startedAt']} ms")
    print(f"stream:    {stream['status']}, {last_seq} events written")
    print(f"follower:  saw {len(seen)} events, seq {seen[0]['seq']}..{seen[-1]['seq']}" if seen
          else "follower:  saw no events")
    print(f"           {''.join(e['delta'] for e in seen if e['type'] == 'TEXT_MESSAGE_CONTENT').strip()}")
    threads = storage.memory.threads.list(agent_name="assistant")
    print(f"threads of agent 'assistant' in this database: {len(threads)}")
    db.close()
    return 0 if len(seen) == last_seq else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
