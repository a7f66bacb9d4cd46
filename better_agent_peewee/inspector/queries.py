"""What the inspector reads, each statement an index lookup bounded by a page size or a cap.

No page counts or scans a whole table: an agent list is a skip scan of an index (one short
index probe per agent), counts stop at `COUNT_CAP` (shown as "1,000+"), charts and
percentiles read a bounded sample of the newest runs per agent and status, and every list
is a keyset page (``WHERE key < last ORDER BY key DESC LIMIT page``) of an index whose
leading columns are the filter. tests/test_inspector_explain.py EXPLAINs each statement.
"""
from __future__ import annotations

from .overview_reads import OverviewReads
from .run_reads import RunReads
from .statements import (
    CHART_CAP,
    COUNT_CAP,
    DURATION_SAMPLE,
    EVENTS_PAGE,
    MAX_AGENTS,
    MESSAGES_PAGE,
    PAGE,
    TITLE_SCAN,
    RunRow,
)
from .thread_reads import SearchCursor, ThreadReads

__all__ = ["Reader", "RunRow", "SearchCursor", "COUNT_CAP", "PAGE", "EVENTS_PAGE", "MESSAGES_PAGE",
           "MAX_AGENTS", "CHART_CAP", "DURATION_SAMPLE", "TITLE_SCAN"]


class Reader(OverviewReads, ThreadReads, RunReads):
    """The inspector's statements over one storage: every read of every page, one cache.

    The reads are split by what they read: the overview's (overview_reads: `agents`,
    `agent_counts`, `hours`, `durations`, `running`), the thread pages'
    (thread_reads: `threads`, `search_threads`, `messages`, `thread_runs`) and the run pages'
    (run_reads: `runs`, `events`), over the shared machinery in statements.
    """
