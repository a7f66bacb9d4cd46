"""Workloads W1-W9 (W10, prune, lives in `bench.prune_memory`): data, adapter side, baseline side.

Data is built once per run with bulk inserts through the raw driver, in exactly the format the
adapter writes (the baseline codecs produce it). Adapter and baseline work on the same tables:
reads hit the same rows, writes go to different ids / threads / streams of the same tables.

| W  | job                                                       | data                          |
|----|-----------------------------------------------------------|-------------------------------|
| W1 | ``set`` a run record: a new id, then the same id again    | 100,000 runs                  |
| W2 | ``get`` a run by id                                       | 100,000 runs                  |
| W3 | latest thread run: where threadId, orderBy startedAt desc, take 1 | 100,000 runs / 1,000 threads |
| W4 | ``memory.messages.append`` a batch of 10                  | 100,000 messages              |
| W5 | ``memory.messages.list(limit=20)`` of one thread          | 100,000 messages / 1,000 threads |
| W6 | ``streams.append`` one event (also against a baseline keeping the same promises) |   |
| W7 | ``streams.append_many`` 100 events                        |                               |
| W8 | one ``resume`` poll on a closed stream of 100 vs 100,000 events | 100,100 events          |
| W9 | append-to-receipt latency through ``resume`` at 25 ms and 5 ms polls |                    |
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .baseline import EVENT_COLUMNS, MESSAGE_COLUMNS, RUN_COLUMNS, Raw, dumps
from .env import Target
from .harness import Row, Settings, compare, missing_row, ratio_row

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z: data timestamps count up from here


@dataclasses.dataclass
class Sizes:
    """Data sizes of one run (the issue's numbers; `quick` shrinks them for the smoke run)."""

    runs: int = 100_000
    run_threads: int = 1_000
    messages: int = 100_000
    message_threads: int = 1_000
    small_stream: int = 100
    large_stream: int = 100_000
    #: W9: events per poll interval (seconds).
    latency_events: Tuple[Tuple[float, int], ...] = ((0.025, 300), (0.005, 600))
    prune_runs: int = 100_000
    prune_events_per_run: int = 10

    @classmethod
    def quick(cls) -> Sizes:
        return cls(runs=2_000, run_threads=20, messages=2_000, message_threads=20, small_stream=100,
                   large_stream=2_000, latency_events=((0.025, 8), (0.005, 16)), prune_runs=200,
                   prune_events_per_run=10)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# A run as Better Agent writes it at start, and as it rewrites it at the end.
CONFIG = {"model": "gpt-4o-mini", "temperature": 0.2, "tools": ["search", "calculator"], "maxSteps": 8}
FINAL = {"type": "RUN_FINISHED", "threadId": "thread-0001", "runId": "run", "result": {"text": "done"}}
TEXT = "The quick brown fox jumps over the lazy dog; the agent answers with a sentence or two. "


def running_run(run_id: str, thread_id: str, started: int) -> Dict[str, Any]:
    return {"runId": run_id, "agentName": "support-agent", "threadId": thread_id, "status": "running",
            "config": CONFIG, "startedAt": started, "updatedAt": started}


def finished_run(run_id: str, thread_id: str, started: int, status: str = "completed") -> Dict[str, Any]:
    rec = running_run(run_id, thread_id, started)
    rec.update(status=status, finalEvent=FINAL if status != "failed" else
               {"type": "RUN_ERROR", "message": "tool failed", "code": "TOOL"},
               updatedAt=started + 900, finishedAt=started + 900)
    return rec


def event(i: int, stamp: Optional[int] = None) -> Dict[str, Any]:
    """An AG-UI TEXT_MESSAGE_CONTENT event."""
    ev: Dict[str, Any] = {"type": "TEXT_MESSAGE_CONTENT", "messageId": "msg-1", "delta": f"token {i} "}
    if stamp is not None:
        ev["timestamp"] = stamp
    return ev


class Workloads:
    """The data and W1-W9 of one `Target`."""

    def __init__(self, target: Target, settings: Settings, sizes: Sizes, log: Callable[[str], None]) -> None:
        self.target = target
        self.storage = target.storage
        self.raw = Raw(target.dialect, target.raw, target.is_mariadb)
        self.settings = settings
        self.sizes = sizes
        self.log = log
        self.rng = random.Random(5)
        self.counter = itertools.count()
        # MariaDB: 1.5, elsewhere 1.3 (docs/performance.md).
        self.limit = 1.5 if target.dialect == "mysql" else 1.3
        self.has_memory = hasattr(self.storage.memory, "messages")
        self.has_streams = hasattr(self.storage.streams, "append")

    # -- data --------------------------------------------------------------------------------

    def fresh_connections(self) -> None:
        """Both sides on new connections, made alike, before each workload.

        A connection's past changes what it costs: a PostgreSQL 15 backend that has checked a
        foreign key (the baseline's bulk load, the adapter's `create_tables` or W4) runs every
        later `INSERT ... SELECT` some 60 µs slower, whichever side sends it (bench.append_cost).
        """
        target = self.target
        target.database.close()
        target.raw.close()
        target.raw = target.connect_raw()
        self.raw = Raw(target.dialect, target.raw, target.is_mariadb)

    def build_data(self) -> Dict[str, float]:
        """Bulk-load the shared data (runs, threads, messages, W8 streams); seconds per part."""
        raw, s = self.raw, self.sizes
        took: Dict[str, float] = {}

        start = time.perf_counter()

        def runs() -> Iterator[Tuple[Any, ...]]:
            for i in range(s.runs):
                run_id = f"run-{i:06d}"
                thread_id = f"thread-{i % s.run_threads:04d}"
                started = T0 + i * 1000
                rec = finished_run(run_id, thread_id, started, ("completed", "completed", "failed")[i % 3]) \
                    if i % 10 else running_run(run_id, thread_id, started)
                yield raw.run_row(run_id, rec)

        raw.bulk_load("agent_runs", RUN_COLUMNS, runs())
        took["runs"] = time.perf_counter() - start

        start = time.perf_counter()
        threads = [(f"thread-{j:04d}", "support-agent", None, f"Conversation {j}", None, None,
                    raw.ts_in(T0), raw.ts_in(T0 + 10_000_000)) for j in range(s.message_threads)]
        threads += [(t, "support-agent", None, None, None, None, raw.ts_in(T0), raw.ts_in(T0))
                    for t in ("w4-adapter", "w4-baseline")]
        raw.bulk_load("threads", ("id", "agent_name", "scope", "title", "state", "metadata", "created_at",
                                  "updated_at"), threads)

        per_thread = s.messages // s.message_threads

        def messages() -> Iterator[Tuple[Any, ...]]:
            for k in range(per_thread):  # interleaved, as conversations happen side by side
                for j in range(s.message_threads):
                    thread_id = f"thread-{j:04d}"
                    created = T0 + k * 10_000 + j
                    body = {"id": f"m{k}", "role": "user" if k % 2 == 0 else "assistant",
                            "content": TEXT[: 40 + (k * 7) % 50]}
                    yield (f"{thread_id}:{created}:m{k}", thread_id, None, dumps(body), raw.ts_in(created))

        raw.bulk_load("messages", MESSAGE_COLUMNS, messages())
        took["messages"] = time.perf_counter() - start

        start = time.perf_counter()
        for name, count in (("w8-small", s.small_stream), ("w8-large", s.large_stream)):
            self._raw_stream(name, "closed")
            raw.bulk_load("stream_events", EVENT_COLUMNS,
                          (raw.event_row(name, seq, T0 + seq, event(seq)) for seq in range(1, count + 1)))
        took["events"] = time.perf_counter() - start
        return took

    def _raw_stream(self, run_id: str, status: str = "open") -> None:
        raw = self.raw
        stamp = raw.ts_in(now_ms())
        raw.execute(raw.sql("INSERT INTO streams (id, run_id, status, created_at, updated_at, closed_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)"),
                    (run_id, run_id, status, stamp, stamp, stamp if status == "closed" else None))

    # -- W1-W3: the four verbs ------------------------------------------------------------------

    def w1_set(self) -> Row:
        storage, raw = self.storage, self.raw
        upsert = raw.upsert("agent_runs", RUN_COLUMNS, "run_id")
        execute, run_row = raw.execute, raw.run_row

        def inputs(side: str, n: int) -> List[Tuple[str, Dict[str, Any]]]:
            out: List[Tuple[str, Dict[str, Any]]] = []
            while len(out) < n:  # a new id (run start), then the same id again (run end)
                run_id = f"w1-{side}-{next(self.counter)}"
                started = now_ms()
                out.append((run_id, running_run(run_id, "thread-w1", started)))
                out.append((run_id, finished_run(run_id, "thread-w1", started)))
            return out[:n]

        def adapter(n: int) -> Callable[[], None]:
            items = inputs("a", n)
            set_ = storage.set

            def run() -> None:
                for run_id, rec in items:
                    set_("runs", run_id, rec)
            return run

        def baseline(n: int) -> Callable[[], None]:
            items = inputs("b", n)

            def run() -> None:
                for run_id, rec in items:
                    execute(upsert, run_row(run_id, rec))
            return run

        return ratio_row("W1", "set a run (new id, then same id)", compare(adapter, baseline, self.settings),
                         self.limit)

    def w2_get(self) -> Row:
        storage, raw = self.storage, self.raw
        sql = raw.sql(f"SELECT {', '.join(RUN_COLUMNS)} FROM agent_runs WHERE run_id = ?")
        execute, run_record = raw.execute, raw.run_record
        ids = [f"run-{i:06d}" for i in range(self.sizes.runs)]

        def adapter(n: int) -> Callable[[], None]:
            chosen = [self.rng.choice(ids) for _ in range(n)]
            get = storage.get

            def run() -> None:
                for run_id in chosen:
                    if get("runs", run_id) is None:
                        raise AssertionError(run_id)
            return run

        def baseline(n: int) -> Callable[[], None]:
            chosen = [self.rng.choice(ids) for _ in range(n)]

            def run() -> None:
                for run_id in chosen:
                    row = execute(sql, (run_id,)).fetchone()
                    if row is None or run_record(row) is None:
                        raise AssertionError(run_id)
            return run

        return ratio_row("W2", "get a run by id", compare(adapter, baseline, self.settings), self.limit)

    def w3_latest(self) -> Row:
        storage, raw = self.storage, self.raw
        sql = raw.sql(f"SELECT {', '.join(RUN_COLUMNS)} FROM agent_runs WHERE thread_id = ? "
                      "ORDER BY started_at DESC LIMIT 1")
        execute, run_record = raw.execute, raw.run_record
        threads = [f"thread-{j:04d}" for j in range(self.sizes.run_threads)]

        def adapter(n: int) -> Callable[[], None]:
            chosen = [self.rng.choice(threads) for _ in range(n)]
            list_ = storage.list

            def run() -> None:
                for thread_id in chosen:
                    items = list_("runs", {"where": {"threadId": thread_id}, "orderBy": {"startedAt": "desc"},
                                           "take": 1})["items"]
                    if len(items) != 1:
                        raise AssertionError(thread_id)
            return run

        def baseline(n: int) -> Callable[[], None]:
            chosen = [self.rng.choice(threads) for _ in range(n)]

            def run() -> None:
                for thread_id in chosen:
                    items = [run_record(row) for row in execute(sql, (thread_id,)).fetchall()]
                    if len(items) != 1:
                        raise AssertionError(thread_id)
            return run

        return ratio_row("W3", f"latest run of a thread ({self.sizes.runs:,} runs)",
                         compare(adapter, baseline, self.settings), self.limit)

    # -- W4-W5: memory -----------------------------------------------------------------------

    def _messages(self, n: int) -> List[List[Dict[str, Any]]]:
        return [[{"id": f"w4-{next(self.counter)}", "role": "user" if i % 2 == 0 else "assistant",
                  "content": TEXT[: 40 + i * 5]} for i in range(10)] for _ in range(n)]

    def w4_append(self) -> Row:
        if not self.has_memory:
            return missing_row("W4", "memory.messages.append 10", "storage.memory.messages not implemented")
        storage, raw = self.storage, self.raw
        insert_many, transaction, ts_in = raw.insert_many, raw.transaction, raw.ts_in

        def adapter(n: int) -> Callable[[], None]:
            batches = self._messages(n)
            append = storage.memory.messages.append

            def run() -> None:
                for batch in batches:
                    append("w4-adapter", batch)
            return run

        def baseline(n: int) -> Callable[[], None]:
            batches = self._messages(n)

            def append(thread_id: str, messages: List[Dict[str, Any]], run_id: Optional[str] = None) -> None:
                now = now_ms()
                rows = [(f"{thread_id}:{now + i}:{m['id']}", thread_id, run_id, dumps(m), ts_in(now + i))
                        for i, m in enumerate(messages)]
                transaction(lambda: insert_many("messages", MESSAGE_COLUMNS, rows))

            def run() -> None:
                for batch in batches:
                    append("w4-baseline", batch)
            return run

        return ratio_row("W4", "memory.messages.append, batch of 10",
                         compare(adapter, baseline, self.settings), self.limit)

    def w5_list(self) -> Row:
        if not self.has_memory:
            return missing_row("W5", "memory.messages.list limit=20",
                               "storage.memory.messages not implemented")
        storage, raw = self.storage, self.raw
        sql = raw.sql(f"SELECT {', '.join(MESSAGE_COLUMNS)} FROM messages WHERE thread_id = ? "
                      "ORDER BY created_at DESC LIMIT 20")
        execute, message_record = raw.execute, raw.message_record
        threads = [f"thread-{j:04d}" for j in range(self.sizes.message_threads)]
        expect = min(20, self.sizes.messages // self.sizes.message_threads)

        def adapter(n: int) -> Callable[[], None]:
            chosen = [self.rng.choice(threads) for _ in range(n)]
            list_ = storage.memory.messages.list

            def run() -> None:
                for thread_id in chosen:
                    if len(list_(thread_id, limit=20)) != expect:
                        raise AssertionError(thread_id)
            return run

        def baseline(n: int) -> Callable[[], None]:
            chosen = [self.rng.choice(threads) for _ in range(n)]

            def run() -> None:
                for thread_id in chosen:
                    rows = execute(sql, (thread_id,)).fetchall()
                    items = [message_record(row) for row in reversed(rows)]
                    if len(items) != expect:
                        raise AssertionError(thread_id)
            return run

        return ratio_row("W5", f"memory.messages.list limit=20 ({self.sizes.messages:,} messages)",
                         compare(adapter, baseline, self.settings), self.limit)

    # -- W6-W9: streams ----------------------------------------------------------------------

    def _append_sql(self, same_promises: bool = False) -> str:
        """One statement: the next seq of an existing stream, or no row when the stream is missing.

        With `same_promises`, what the adapter also promises: no event for a closed stream, the
        stream row held shared so that a close racing the append waits for it (PostgreSQL,
        MySQL), and on PostgreSQL a NOTIFY waking the followers of other processes.
        """
        raw = self.raw
        guard = ""
        if same_promises:
            locks = {"postgres": " FOR SHARE OF s", "mysql": " LOCK IN SHARE MODE"}
            guard = " AND s.status = 'open'" + locks.get(raw.dialect, "")
        if raw.dialect == "mysql":
            # LAST_INSERT_ID(expr) hands the new seq back in the OK packet (cursor.lastrowid).
            return raw.sql(
                'INSERT INTO stream_events (id, run_id, seq, "timestamp", event) '
                "SELECT CONCAT(s.id, ':', n.seq), s.id, LAST_INSERT_ID(n.seq), ?, ? FROM streams s, "
                "(SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM stream_events WHERE run_id = ?) n "
                "WHERE s.id = ?" + guard)
        postgres_notify = same_promises and raw.dialect == "postgres"
        notify = ", pg_notify('better_agent_streams', run_id)" if postgres_notify else ""
        return raw.sql(
            'INSERT INTO stream_events (id, run_id, seq, "timestamp", event) '
            "SELECT s.id || ':' || n.seq, s.id, n.seq, ?, ? FROM streams s, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM stream_events WHERE run_id = ?) n WHERE s.id = ?"
            f"{guard} RETURNING seq{notify}")

    def baseline_append(self, same_promises: bool = False) -> Callable[[str, Dict[str, Any]], int]:
        """The raw-driver `append(run_id, event) -> seq`: one statement, retried on a seq race
        (`same_promises`: see `_append_sql`; a closed stream then stores nothing, as a missing one)."""
        raw = self.raw
        sql, execute, ts_in = self._append_sql(same_promises), raw.execute, raw.ts_in
        mysql = raw.dialect == "mysql"
        integrity = _integrity_errors(raw.dialect)

        def append(run_id: str, ev: Dict[str, Any]) -> int:
            stamp = ev.get("timestamp")
            if type(stamp) is not int:
                stamp = now_ms()
            params = (ts_in(stamp), dumps(ev), run_id, run_id)
            while True:
                try:
                    cursor = execute(sql, params)
                    if mysql:
                        if cursor.rowcount != 1:
                            raise LookupError(f"stream {run_id!r} does not exist")
                        return cursor.lastrowid
                    row = cursor.fetchone()
                    if row is None:
                        raise LookupError(f"stream {run_id!r} does not exist")
                    return row[0]
                except integrity:  # another writer took this seq: read the new last seq and retry
                    continue

        return append

    def w6_append(self) -> List[Row]:
        if not self.has_streams:
            return [missing_row("W6", "streams.append 1 event", "storage.streams.append not implemented")]
        storage = self.storage
        storage.streams.open("w6-adapter")
        self._raw_stream("w6-baseline")
        append_raw = self.baseline_append()

        def appending(append: Callable[[str, Dict[str, Any]], int], stream: str
                      ) -> Callable[[int], Callable[[], None]]:
            def side(n: int) -> Callable[[], None]:
                events = [event(i, now_ms()) for i in range(n)]

                def run() -> None:
                    for ev in events:
                        append(stream, ev)
                return run
            return side

        adapter = appending(storage.streams.append, "w6-adapter")
        row = ratio_row("W6", "streams.append 1 event",
                        compare(adapter, appending(append_raw, "w6-baseline"), self.settings), self.limit)
        self._check_seqs("w6-adapter")
        self._check_seqs("w6-baseline")

        # The same, against a baseline that keeps the adapter's promises too (`_append_sql`).
        self._raw_stream("w6-promises")
        baseline_kept = appending(self.baseline_append(same_promises=True), "w6-promises")

        kept = ratio_row("W6", "streams.append 1 event, baseline with the same promises",
                         compare(adapter, baseline_kept, self.settings), self.limit,
                         note="closed refused, close waits"
                              + (", NOTIFY" if self.raw.dialect == "postgres" else ""))
        self._check_seqs("w6-adapter")
        self._check_seqs("w6-promises")
        return [row, kept]

    def _check_seqs(self, run_id: str) -> None:
        raw = self.raw
        count, low, high = raw.execute(raw.sql("SELECT COUNT(*), MIN(seq), MAX(seq) FROM stream_events "
                                               "WHERE run_id = ?"), (run_id,)).fetchone()
        if count and (low != 1 or high != count):
            raise AssertionError(f"{run_id}: {count} events with seq {low}..{high}")

    def w7_append_many(self) -> Row:
        if not self.has_streams:
            return missing_row("W7", "streams.append_many 100", "storage.streams.append_many not implemented")
        storage, raw = self.storage, self.raw
        storage.streams.open("w7-adapter")
        self._raw_stream("w7-baseline")
        head = raw.sql("SELECT (SELECT COUNT(*) FROM streams WHERE id = ?), "
                       "(SELECT COALESCE(MAX(seq), 0) FROM stream_events WHERE run_id = ?)")
        execute, transaction, insert_many, event_row = (raw.execute, raw.transaction, raw.insert_many,
                                                        raw.event_row)
        integrity = _integrity_errors(raw.dialect)

        def append_many(run_id: str, events: List[Dict[str, Any]]) -> List[int]:
            def body() -> List[int]:
                exists, last = execute(head, (run_id, run_id)).fetchone()
                if not exists:
                    raise LookupError(f"stream {run_id!r} does not exist")
                now = now_ms()
                rows = []
                for i, ev in enumerate(events, last + 1):
                    stamp = ev.get("timestamp")
                    rows.append(event_row(run_id, i, stamp if type(stamp) is int else now, ev))
                insert_many("stream_events", EVENT_COLUMNS, rows)
                return list(range(last + 1, last + 1 + len(events)))

            while True:
                try:
                    return transaction(body)
                except integrity:  # a concurrent appender took these seqs: retry
                    continue

        def adapter(n: int) -> Callable[[], None]:
            batches = [[event(i, now_ms()) for i in range(100)] for _ in range(n)]
            append = storage.streams.append_many

            def run() -> None:
                for batch in batches:
                    append("w7-adapter", batch)
            return run

        def baseline(n: int) -> Callable[[], None]:
            batches = [[event(i, now_ms()) for i in range(100)] for _ in range(n)]

            def run() -> None:
                for batch in batches:
                    append_many("w7-baseline", batch)
            return run

        row = ratio_row("W7", "streams.append_many 100 events", compare(adapter, baseline, self.settings),
                        self.limit)
        self._check_seqs("w7-adapter")
        self._check_seqs("w7-baseline")
        return row

    def w8_poll(self) -> List[Row]:
        if not self.has_streams:
            return [missing_row("W8", "resume poll 100 vs 100k events",
                                "storage.streams.resume not implemented")]
        storage, raw = self.storage, self.raw
        small, large = self.sizes.small_stream, self.sizes.large_stream
        tail = 10  # each poll delivers the last 10 events of a closed stream, then resume ends
        resume = storage.streams.resume
        select = raw.sql('SELECT seq, event FROM stream_events WHERE run_id = ? AND seq > ? ORDER BY seq')
        status = raw.sql("SELECT status FROM streams WHERE id = ?")
        execute, load = raw.execute, raw.json_out

        def adapter(run_id: str, last: int) -> Callable[[int], Callable[[], None]]:
            def prepare(n: int) -> Callable[[], None]:
                def run() -> None:
                    for _ in range(n):
                        got = 0
                        for _ev in resume(run_id, after_seq=last - tail, poll_interval=0.025, timeout=5):
                            got += 1
                        if got != tail:
                            raise AssertionError(f"{run_id}: resume gave {got} events, expected {tail}")
                return run
            return prepare

        def baseline(run_id: str, last: int) -> Callable[[int], Callable[[], None]]:
            def prepare(n: int) -> Callable[[], None]:
                def run() -> None:
                    for _ in range(n):
                        events = []
                        for seq, ev in execute(select, (run_id, last - tail)).fetchall():
                            ev = load(ev)
                            ev["seq"] = seq
                            events.append(ev)
                        closed = execute(status, (run_id,)).fetchone()[0] == "closed"
                        if len(events) != tail or not closed:
                            raise AssertionError(run_id)
                return run
            return prepare

        growth = compare(adapter("w8-large", large), adapter("w8-small", small), self.settings)
        versus = compare(adapter("w8-large", large), baseline("w8-large", large), self.settings)
        k = f"{large // 1000}k" if large >= 1000 else str(large)
        return [
            # Here both columns are the adapter: polls/s on the long stream vs on the short one.
            dataclasses.replace(
                ratio_row("W8", f"resume poll, {k}-event stream vs {small}-event stream", growth, 1.5),
                target="cost ratio <= 1.5", note="both columns adapter"),
            dataclasses.replace(
                ratio_row("W8", f"resume poll on the {k}-event stream", versus, self.limit),
                target="(info)", passed=None),
        ]

    def w9_latency(self) -> List[Row]:
        if not self.has_streams:
            return [missing_row("W9", "resume delivery latency", "storage.streams.resume not implemented")]
        rows = []
        for poll, count in self.sizes.latency_events:
            latencies = self._latency(poll, count)
            latencies.sort()
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))] * 1000
            ms = poll * 1000
            details = {"events": count, "poll_interval_ms": ms, "max_ms": latencies[-1] * 1000,
                       "mean_ms": statistics.fmean(latencies) * 1000}
            rows.append(Row("W9", f"delivery latency p50, poll {ms:g} ms", p50, None, "ms", None,
                            f"<= {ms + 5:g} ms", p50 <= ms + 5, "", details))
            rows.append(Row("W9", f"delivery latency p99, poll {ms:g} ms", p99, None, "ms", None,
                            f"<= {2 * ms + 10:g} ms", p99 <= 2 * ms + 10, "", details))
        return rows

    def _latency(self, poll: float, count: int) -> List[float]:
        """A writer thread appends `count` events at random gaps; the reader follows with resume."""
        storage = self.storage
        run_id = f"w9-{poll}-{next(self.counter)}"
        storage.streams.open(run_id)
        failure: List[BaseException] = []
        rng = random.Random(9)

        def writer() -> None:
            try:
                for i in range(count):
                    time.sleep(rng.uniform(0, 2 * poll))  # gaps unrelated to the reader's poll phase
                    storage.streams.append(run_id, {"type": "CUSTOM", "name": "bench", "value": i,
                                                    "sentAt": time.perf_counter()})
                storage.streams.close(run_id)
            except BaseException as exc:  # reported by the reader's thread
                failure.append(exc)
                storage.streams.close(run_id)
            finally:
                storage.database.close()

        latencies: List[float] = []
        thread = threading.Thread(target=writer, name="bench-w9-writer")
        thread.start()
        try:
            for ev in storage.streams.resume(run_id, poll_interval=poll, timeout=count * poll * 4 + 30):
                latencies.append(time.perf_counter() - ev["sentAt"])
        finally:
            thread.join()
        if failure:
            raise failure[0]
        if len(latencies) != count:
            raise AssertionError(f"W9: received {len(latencies)} of {count} events")
        return latencies


def _integrity_errors(dialect: str) -> Tuple[type, ...]:
    if dialect == "sqlite":
        import sqlite3
        return (sqlite3.IntegrityError,)
    if dialect == "postgres":
        import psycopg2
        return (psycopg2.IntegrityError,)
    import pymysql
    return (pymysql.IntegrityError,)
