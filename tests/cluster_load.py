"""Workloads for the cluster suite: writers and followers on one stream, run and thread,
every call counted, and the checks that nothing was lost, duplicated or misnumbered.

No pytest in here: `python -m tests.cluster_load` prints the figures of each scenario
(writes acknowledged, errors seen, failover time) for docs/scaling.md.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import Counter
from typing import Any, Callable

import peewee

RUN = "cluster-run"
THREAD = "cluster-thread"


def describe(exc: BaseException) -> str:
    """Exception class and the first line of its text, for error counts."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:90]}"


class Writer(threading.Thread):
    """Appends events, replaces the run and thread records, appends messages, in a loop."""

    def __init__(self, storage: Any, name: str, stop: threading.Event, ops: tuple[str, ...]) -> None:
        super().__init__(name=name, daemon=True)
        self.storage, self.stop, self.ops = storage, stop, ops
        self.acked_events: list[tuple[int, str]] = []  # (seq, token)
        self.acked_messages: list[str] = []
        self.errors: Counter[str] = Counter()
        self.calls = 0
        self.crash: BaseException | None = None
        self.error_times: list[float] = []

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        self.calls += 1
        try:
            return fn()
        except Exception as exc:  # counted: the caller-visible errors are the measure
            self.errors[f"{what}: {describe(exc)}"] += 1
            self.error_times.append(time.monotonic())
            return None

    def run(self) -> None:
        k = 0
        try:
            while not self.stop.is_set():
                k += 1
                self.step(k)
        except BaseException as exc:  # a bug in the workload itself
            self.crash = exc
            traceback.print_exc()

    def step(self, k: int) -> None:
        """One round: each of `ops` once."""
        s = self.storage
        token = f"{self.name}:{k}"
        if "append" in self.ops:
            seq = self.call("streams.append", lambda: s.streams.append(RUN, {"type": "T", "token": token}))
            if seq is not None:
                self.acked_events.append((seq, token))
        if "runs" in self.ops:
            self.call("set(runs)", lambda: s.set("runs", RUN, {
                "runId": RUN, "agentName": "a", "status": "running", "startedAt": 1, "updatedAt": k,
                "config": {"w": self.name}}))
        if "threads" in self.ops:
            self.call("threads.set", lambda: s.memory.threads.set(THREAD, {
                "agentName": "a", "createdAt": 1, "updatedAt": k, "title": self.name}))
        if "messages" in self.ops:
            mid = f"m-{uuid.uuid4().hex}"
            got = self.call("messages.append", lambda: s.memory.messages.append(
                THREAD, [{"id": mid, "role": "user", "content": token}]))
            if got is not None:
                self.acked_messages.append(got[0]["id"])


class Follower(threading.Thread):
    """Follows the stream with `resume` until stopped; counts errors, keeps the seqs read."""

    def __init__(self, storage: Any, name: str, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.storage, self.stop = storage, stop
        self.seqs: list[int] = []
        self.tokens: dict[int, str] = {}
        self.errors: Counter[str] = Counter()
        self.lag: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            after = self.seqs[-1] if self.seqs else 0
            try:
                for item in self.storage.streams.resume(RUN, after, poll_interval=0.01, stop=self.stop):
                    self.seqs.append(item["seq"])
                    self.tokens[item["seq"]] = item["token"]
                    if "t" in item:
                        self.lag.append(time.time() - item["t"])
            except Exception as exc:
                self.errors[f"resume: {describe(exc)}"] += 1
                time.sleep(0.05)


def setup(storage: Any) -> None:
    """The stream, run and thread every worker writes to."""
    storage.streams.open(RUN)
    storage.set("runs", RUN, {"runId": RUN, "agentName": "a", "status": "running", "startedAt": 1,
                              "updatedAt": 1})
    storage.memory.threads.set(THREAD, {"agentName": "a", "createdAt": 1, "updatedAt": 1})


def check(storage: Any, writers: list[Writer], followers: list[Follower] | None = None,
          label: str = "") -> dict[str, int]:
    """Assert nothing lost, nothing duplicated and seq exact as `storage` sees it."""
    events = storage.list("streamEvents", {"where": {"runId": RUN}, "orderBy": {"seq": "asc"}})["items"]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"{label}: seqs are not 1..N: {seqs[:5]}..."
    by_seq = {e["seq"]: e["event"]["token"] for e in events}
    tokens = Counter(by_seq.values())
    dup = [t for t, n in tokens.items() if n > 1]
    assert not dup, f"{label}: events stored twice: {dup[:5]}"
    acked = [(seq, tok) for w in writers for seq, tok in w.acked_events]
    wrong = [(seq, tok) for seq, tok in acked if by_seq.get(seq) != tok]
    assert not wrong, f"{label}: acknowledged events missing or under another seq: {wrong[:5]}"
    messages = {m["id"] for m in storage.memory.messages.list(THREAD)}
    missing = [m for w in writers for m in w.acked_messages if m not in messages]
    assert not missing, f"{label}: acknowledged messages missing: {missing[:5]}"
    for f in followers or []:
        assert f.seqs == list(range(1, len(f.seqs) + 1)), f"{label}: follower read {f.seqs[:10]}..."
        assert all(by_seq[q] == f.tokens[q] for q in f.seqs), f"{label}: follower read other events"
    return {"events": len(seqs), "messages": len(messages)}


def run_load(make_storage: Callable[[int], Any], writers: int, seconds: float,
             fault: Callable[[], Any] | None = None, followers: int = 0,
             ops: tuple[str, ...] = ("append", "runs", "threads", "messages"),
             follower_storage: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run `writers` writers (writer i on ``make_storage(i)``) and followers for `seconds`;
    call `fault()` halfway (its result is reported). Returns the figures and the threads."""
    stop = threading.Event()
    crew = [Writer(make_storage(i), f"w{i}", stop, ops) for i in range(writers)]
    readers = [Follower((follower_storage or make_storage)(i), f"f{i}", stop) for i in range(followers)]
    for t in [*crew, *readers]:
        t.start()
    fault_result = None
    t0 = time.monotonic()
    try:
        if fault is not None:
            time.sleep(seconds / 2)
            fault_at = time.monotonic()
            fault_result = fault()
            time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        else:
            time.sleep(seconds)
    finally:
        stop.set()
        for t in [*crew, *readers]:
            t.join(60)
    errors: Counter[str] = Counter()
    for t in [*crew, *readers]:
        errors.update(t.errors)
    result: dict[str, Any] = {
        "calls": sum(w.calls for w in crew),
        "acknowledged_events": sum(len(w.acked_events) for w in crew),
        "acknowledged_messages": sum(len(w.acked_messages) for w in crew),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(8)),
        "fault": fault_result,
        "writers": crew,
        "followers": readers,
        "hung": [t.name for t in [*crew, *readers] if t.is_alive()],
    }
    if fault is not None:
        result["error_window"] = _error_window([*crew], fault_at)
    return result


def _error_window(crew: list[Writer], fault_at: float) -> float | None:
    times = [t for w in crew for t in w.error_times if t >= fault_at]
    return (max(times) - fault_at) if times else None


def close(db: peewee.Database) -> None:
    """Close a database object's connection(s), ignoring a dead one."""
    try:
        db.close_all() if hasattr(db, "close_all") else db.close()
    except Exception:  # a connection that died with its server
        pass
