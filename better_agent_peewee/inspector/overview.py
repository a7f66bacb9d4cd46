"""The overview: agents with their counts, runs per hour, durations, running runs."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from . import charts
from .layout import Context, badge, count, field, form, link, page, table
from .markup import Markup, ago, duration, href, iso, join, tag
from .queries import CHART_CAP, COUNT_CAP, DURATION_SAMPLE, MAX_AGENTS, Reader, RunRow

__all__ = ["overview"]

DAY = 86_400_000


def overview(reader: Reader, ctx: Context) -> Markup:
    """GET /: the whole page."""
    agents = reader.agents()
    now = ctx.now_ms
    since_7d = (now // charts.HOUR - 7 * 24 + 1) * charts.HOUR
    spans = reader.durations(agents)
    rows = [_agent_row(agent, counts, durations)
            for agent, counts, durations in zip(agents, reader.agent_counts(agents), spans)]
    merged: Dict[str, Dict[int, int]] = {}
    partial: Optional[int] = None
    for hours in reader.hours(agents, since_7d):
        for status, counted in hours.counts.items():
            into = merged.setdefault(status, {})
            for number, n in counted.items():
                into[number] = into.get(number, 0) + n
        if hours.partial_before is not None:  # a status of this agent was sampled: older hours are partial
            partial = max(partial or hours.partial_before, hours.partial_before)
    body = [
        tag("section", None, tag("h2", None, "Agents"),
            table(["agent", "threads", *charts.STATUS_ORDER, "p50", "p95"], rows, empty="No agents yet: "
                  "no runs or threads are stored.", class_="agents"),
            tag("p", {"class": "muted"}, f"Counts stop at {COUNT_CAP:,} ({COUNT_CAP:,}+); the first "
                f"{MAX_AGENTS} agents are shown.") if agents else None),
        tag("section", None, tag("h2", None, "Runs per hour"), _legend(),
            _chart("Last 24 hours", charts.bucket(merged, now, 24), now, partial),
            _chart("Last 7 days", charts.bucket(merged, now, 24 * 7), now, partial),
            tag("p", {"class": "muted"}, f"Read from the newest {CHART_CAP} runs of each agent and status; "
                f"hours before {iso(partial)} UTC are partly counted (pale)." if partial else None)),
        tag("section", None, tag("h2", None, "Run duration"),
            charts.durations([(a, charts.percentile(d, 50), charts.percentile(d, 95), len(d))
                              for a, d in zip(agents, spans)]),
            tag("p", {"class": "muted"}, f"Over each agent's newest {DURATION_SAMPLE} finished runs.")),
        _running(reader.running(), ctx),
    ]
    return page("Overview", join(body), active="overview")


def _chart(title: str, bins: List[Dict[str, int]], now: int, partial: Optional[int]) -> Markup:
    peak = max([sum(b.values()) for b in bins] + [0])
    return join([tag("h3", None, f"{title} · {sum(sum(b.values()) for b in bins):,} runs, at most {peak:,} "
                     f"in an hour"), charts.hourly(bins, now, f"runs per hour, {title.lower()}", partial)])


def _agent_row(agent: str, counts: Dict[str, int], spans: List[int]) -> List[Any]:
    cells: List[Any] = [link(agent, "agents", agent, "threads"),
                        link(count(counts["threads"], COUNT_CAP), "agents", agent, "threads")]
    for status in charts.STATUS_ORDER:
        n = counts.get(status, 0)
        cells.append(tag("a", {"href": href("runs", agent=agent, status=status),
                               "class": f"n s-{status}" if n else "n zero"}, count(n, COUNT_CAP)))
    cells += [duration(charts.percentile(spans, 50)), duration(charts.percentile(spans, 95))]
    return cells


def _legend() -> Markup:
    keys = [tag("span", {"class": f"key s-{s}"}, s) for s in charts.STATUS_ORDER]
    return tag("p", {"class": "legend"}, *keys)


def _running(runs: List[RunRow], ctx: Context) -> Markup:
    cutoff = ctx.now_ms - ctx.stale_after_ms
    stale = [r for r in runs if (r.updated_at or 0) < cutoff]
    rows: List[Tuple[Any, ...]] = []
    for r in runs:
        looks_stale = (r.updated_at or 0) < cutoff
        rows.append((link(r.run_id, "runs", r.run_id), link(r.agent_name, "agents", r.agent_name, "threads"),
                     badge("stale?", "stale") if looks_stale else badge("running"),
                     iso(r.started_at), ago(r.updated_at, ctx.now_ms)))
    reap: Optional[Markup] = None
    if ctx.allow_writes and stale:
        since = field("not updated for", "stale_after", f"{ctx.stale_after_ms // 1000}s", size="6")
        reap = form("/reap", ctx.csrf, [since], "Reap stale runs", danger=True)
    prune = tag("p", None, tag("a", {"href": "/prune", "class": "button"}, "Prune old runs…")) \
        if ctx.allow_writes else None
    return tag("section", None, tag("h2", None, "Running runs"),
               tag("p", {"class": "muted"}, f"A run not updated for {duration(ctx.stale_after_ms)} is "
                   f"flagged stale?: its worker may be gone ({len(stale)} flagged)."),
               table(["run", "agent", "", "started (UTC)", "last update"], rows, empty="No run is running.",
                     class_="running"), reap, prune)
