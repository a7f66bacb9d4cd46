"""How the stream poller reads the followed streams and is woken: what every database does alike.

The poller (poller.py) owns the thread, the followers' watches and the round plan; the
reading itself is one database's business, so each dialect hands it a `PollReader`
(`Dialect.poll_reader`): SQLite's skips a timed round when `PRAGMA data_version` says nothing
was committed, PostgreSQL's PREPAREs its poll and LISTENs (its `WakeSource` is the
connection's socket), MariaDB/MySQL's checks which streams have news before reading them.
This base reads every chunk with the dialect's one poll statement and a JSON array.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Protocol, Set, Tuple

if TYPE_CHECKING:
    from .base import Dialect

__all__ = ["PollReader", "WakeSource", "Runner", "Row", "Entry", "POLL_BATCH", "STREAMS_PER_POLL",
           "ROWS_PER_POLL", "json_array"]

#: Widest seq window a poll reads for one stream; more is read by the next poll, at once.
POLL_BATCH = 500
#: Most streams one poll statement reads; more followed streams take more statements per round.
STREAMS_PER_POLL = 500
#: About the most event rows one poll statement may return (the window shrinks as streams add up).
ROWS_PER_POLL = 10_000

#: (run id, status, last seq, seq, event): what a poll returns for a stream with news.
Row = Tuple[Any, ...]
#: (run id, seq after which events are wanted, last seq wanted): one stream of a chunk.
Entry = Tuple[str, int, int]


class Runner(Protocol):
    """What a reader runs its statements through: the storage's executor, on the poller thread."""

    def execute(self, sql: str, params: Any = (), *, idempotent: bool,
                resolve: Optional[Callable[[], Any]] = None) -> Any:
        """Run one statement on the calling thread's connection; the driver's cursor (`Executor.execute`)."""

    def connection(self) -> Any:
        """The calling thread's driver connection, opened if needed."""


def json_array(items: Any) -> str:
    """`items` as the compact JSON array a poll or check statement takes as its one parameter."""
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


class WakeSource:
    """What wakes the poller besides this process's own pokes: nothing, here (a timed poll is how
    other processes' appends are seen). PostgreSQL's is the NOTIFYs on the poller's connection."""

    #: True while other processes' appends arrive through this source (the timed poll only
    #: backs it up then).
    listening = False

    def fileno(self) -> Optional[int]:
        """The socket to wait on for news, or None."""
        return None

    def take(self) -> Optional[Tuple[Set[str], bool]]:
        """The run ids news came for since last asked, and whether some news named no run (then
        every followed stream must be read); None when nothing came. Never waits."""
        return None

    def stop(self) -> None:
        """The connection is gone or given back: nothing arrives any more."""
        self.listening = False


class PollReader:
    """Reads chunks of followed streams for the poller: `params` of a chunk, then `read`.

    One per poller, used on the poller thread only. The plain form: the dialect's poll
    statement (`Dialect.build_poll_sql`) with the chunk as one JSON array parameter.
    """

    #: Most streams one chunk (one statement, or one check) of a round holds.
    streams_per_chunk = STREAMS_PER_POLL

    def __init__(self, runner: Runner, dialect: Dialect, models: Any, connect: Callable[[], Any]) -> None:
        """:param connect: the poller's connection, set up again (`connected`) when it is a new one."""
        self._runner = runner
        self._dialect = dialect
        self._models = models
        self._connect = connect
        self._sql = dialect.build_poll_sql(models)
        self.wake: WakeSource = WakeSource()

    def window(self, streams: int) -> int:
        """The seq window each stream of a chunk of `streams` streams is read with."""
        return max(16, min(POLL_BATCH, ROWS_PER_POLL // streams))

    def connected(self, conn: Any) -> None:
        """The poller is on a new connection `conn`: forget what was tied to the old one and set
        the new one up."""
        self.wake.stop()

    def timed_round(self, unchecked: bool) -> bool:
        """A timed round of every stream is due; False when it can be skipped (nothing was
        committed since the last one). `unchecked`: some follower waits for its first answer."""
        return True

    def failed(self) -> None:
        """A round failed: the next timed round must read."""

    def params(self, entries: List[Entry], full: bool, index: int) -> Any:
        """The parameters that read `entries`, chunk `index` of a round (`full`: a timed round)."""
        return (json_array(entries),)

    def read(self, params: Any) -> List[Row]:
        """The rows of the streams with news among those `params` name."""
        return list(self._runner.execute(self._sql, params, idempotent=True).fetchall())

    def release(self, conn: Any) -> None:
        """Before the pooled connection `conn` goes back to the pool: undo what this reader left
        on it (the caller logs a failure)."""
