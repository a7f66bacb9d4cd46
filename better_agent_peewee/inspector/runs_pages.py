"""Runs: the filtered list, and one run with its record and its stream as a timeline."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from ..records import RUN_STATUSES
from .conversation import NotFound
from .layout import Context, badge, form, link, page, pretty, table
from .markup import Markup, duration, href, iso, join, tag
from .queries import EVENTS_PAGE, MAX_AGENTS, PAGE, Reader

__all__ = ["RunFilter", "runs_page", "run_page"]


class RunFilter:
    """The runs list's filters, as the query string gives them (checked by the app)."""

    def __init__(self, agent: str = "", status: str = "", since_ms: Optional[int] = None,
                 until_ms: Optional[int] = None, since: str = "", until: str = "") -> None:
        self.agent, self.status = agent, status
        self.since_ms, self.until_ms = since_ms, until_ms
        self.since, self.until = since, until


def runs_page(reader: Reader, ctx: Context, f: RunFilter, before: Optional[Tuple[int, str]]) -> Markup:
    """GET /runs?agent=&status=&since=&until=&before_at=&before_id="""
    known = reader.agents(MAX_AGENTS)
    agents = [f.agent] if f.agent else known
    statuses = [f.status] if f.status else list(RUN_STATUSES)
    rows = reader.runs(agents, statuses, f.since_ms, f.until_ms, before)
    cells = [(link(r.run_id, "runs", r.run_id), link(r.agent_name, "agents", r.agent_name, "threads"),
              link(r.thread_id, "threads", r.thread_id) if r.thread_id else "", badge(r.status),
              iso(r.started_at), duration(r.duration_ms) if r.duration_ms is not None else "running")
             for r in rows]
    more = None
    if len(rows) == PAGE:
        last = rows[-1]
        more = tag("a", {"href": href("runs", agent=f.agent, status=f.status, since=f.since, until=f.until,
                                      before_at=last.started_at, before_id=last.run_id),
                         "class": "more", "rel": "next"}, "Older runs →")
    capped = None
    if not f.agent and len(agents) >= MAX_AGENTS:
        capped = tag("p", {"class": "notice"}, f"Runs of the first {MAX_AGENTS} agents (by name) only: "
                     "choose an agent to see another's.")
    shown = known if not f.agent or f.agent in known else known + [f.agent]  # (an agent past the first 50)
    body = join([_filters(shown, f), capped,
                 table(["run", "agent", "thread", "status", "started (UTC)", "duration"], cells,
                       empty="No run matches these filters.", class_="runs"), more])
    return page("Runs", body, active="runs")


def _filters(agents: List[str], f: RunFilter) -> Markup:
    agent_options = [tag("option", {"value": ""}, "any agent")] + [
        tag("option", {"value": a, "selected": a == f.agent}, a) for a in agents]
    status_options = [tag("option", {"value": ""}, "any status")] + [
        tag("option", {"value": s, "selected": s == f.status}, s) for s in RUN_STATUSES]
    quick = [tag("a", {"href": href("runs", agent=f.agent, status=f.status, since=span)}, label)
             for span, label in (("1h", "last hour"), ("24h", "24 h"), ("7d", "7 days"))]
    return tag("form", {"method": "get", "class": "filters"},
               tag("select", {"name": "agent", "aria-label": "agent"}, *agent_options),
               tag("select", {"name": "status", "aria-label": "status"}, *status_options),
               tag("label", None, "since ", tag("input", {"name": "since", "value": f.since, "size": "19",
                                                        "placeholder": "24h or 2026-12-01T09:00"})),
               tag("label", None, "until ", tag("input", {"name": "until", "value": f.until, "size": "19",
                                                        "placeholder": "UTC"})),
               tag("button", {"type": "submit"}, "Filter"), " ", tag("span", {"class": "quick"}, *quick))


def run_page(reader: Reader, ctx: Context, run_id: str, after_seq: int) -> Markup:
    """GET /runs/<id>?after=N"""
    run = reader.storage.runs.get(run_id)
    stream = reader.storage.streams.get(run_id)
    if run is None and stream is None:
        raise NotFound(f"Run {run_id!r} not found.")
    events = reader.events(run_id, after_seq)
    body = join([_record(run, ctx) if run is not None else tag("p", {"class": "muted"},
                                                                "No run record: only a stream."),
                 tag("h2", None, "Stream"), _timeline(run, stream, events, run_id, after_seq)])
    return page(f"Run {run_id}", body)


def _record(run: Dict[str, Any], ctx: Context) -> Markup:
    started, finished = run.get("startedAt"), run.get("finishedAt")
    took = duration(finished - started) if finished is not None and started is not None else "running"
    agent, thread = run.get("agentName"), run.get("threadId")
    facts = table(["agent", "thread", "status", "started (UTC)", "finished (UTC)", "duration", "scope"], [(
        link(agent, "agents", agent, "threads") if agent else "",
        link(thread, "threads", thread) if thread else "", badge(run.get("status")), iso(started),
        iso(finished), took, run.get("scope") or "")], class_="record")
    final = run.get("finalEvent")
    error = None
    if isinstance(final, dict) and final.get("type") == "RUN_ERROR":
        error = tag("div", {"class": "error", "role": "alert"}, tag("strong", None, "Error"),
                    f" {final.get('code')}: " if final.get("code") else ": ", str(final.get("message") or ""))
    abort = None
    if run.get("status") == "running":
        asked = run.get("abortRequestedAt")
        if asked is not None:
            abort = tag("p", {"class": "muted"}, f"Abort requested at {iso(asked)} UTC.")
        elif ctx.allow_writes:
            abort = form(href("runs", run["runId"], "abort"), ctx.csrf, [], "Abort this run", danger=True)
    return join([facts, error, abort,
                 tag("details", {"class": "final", "open": True}, tag("summary", None, "Final event"),
                     pretty(final)) if final is not None else None,
                 tag("details", {"class": "config"}, tag("summary", None, "Config"),
                     pretty(run.get("config"))) if run.get("config") is not None else None])


def event_item(seq: int, event: Dict[str, Any], since_start: Optional[int]) -> Markup:
    """One row of the timeline (the page's script builds the same for live events)."""
    offset = "" if since_start is None else f"+{duration(since_start)}"
    return tag("li", {"class": "event", "data-seq": seq},
               tag("details", None,
                   tag("summary", None, tag("span", {"class": "seq"}, seq), " ",
                       tag("span", {"class": "type"}, str(event.get("type", "?"))), " ",
                       tag("span", {"class": "offset"}, offset)),
                   tag("pre", {"class": "json"},
                       json.dumps(event, indent=2, ensure_ascii=False, default=str))))


def _timeline(run: Optional[Dict[str, Any]], stream: Optional[Dict[str, Any]], events: List[Dict[str, Any]],
              run_id: str, after_seq: int) -> Markup:
    start = (run or {}).get("startedAt") or (events[0]["timestamp"] if events else None)
    items = [event_item(e["seq"], e["event"], e["timestamp"] - start if start is not None and
                        e["timestamp"] is not None else None) for e in events]
    full = len(events) == EVENTS_PAGE
    last = events[-1]["seq"] if events else after_seq
    live = stream is not None and stream.get("status") == "open" and not full
    status = "no stream" if stream is None else ("following…" if live else str(stream.get("status")))
    nav = [tag("a", {"href": href("runs", run_id), "class": "more"}, "← first events") if after_seq else None,
           tag("a", {"href": href("runs", run_id, after=last), "class": "more", "rel": "next"},
               "next events →") if full else None]
    return join([tag("p", None, "Stream: ", tag("span", {"id": "live-status"}, status)),
                 tag("ol", {"id": "timeline", "class": "timeline", "data-live": "1" if live else None,
                            "data-last-seq": last, "data-start-ms": start,
                            "data-stream": href("api", "runs", run_id, "stream")}, *items),
                 tag("p", {"class": "muted empty"}, "No events yet.") if not items and not live else None,
                 join(nav)])


def prune_page(ctx: Context, older_than: str, report: Any, error: Optional[str]) -> Markup:
    """GET /prune?older_than=: the form, and with a duration the dry run and the confirm button."""
    ask = tag("form", {"method": "get", "class": "filters"},
              tag("label", None, "finished more than ",
                  tag("input", {"name": "older_than", "value": older_than, "size": "6",
                                "placeholder": "30d"}),
                  " ago"),
              tag("button", {"type": "submit"}, "Preview"))
    parts: List[Any] = [tag("p", None, "Deletes finished runs (completed, failed, aborted) with their "
                            "streams and events; threads and messages stay. Preview first: nothing is "
                            "deleted until you confirm."), ask]
    if error:
        parts.append(tag("p", {"class": "error", "role": "alert"}, error))
    if report is not None:
        parts.append(tag("p", {"class": "preview"}, report.summary()))
        parts.append(form("/prune", ctx.csrf, [tag("input", {"type": "hidden", "name": "older_than",
                                                             "value": older_than})],
                          f"Delete {report.runs:,} runs, {report.streams:,} streams, "
                          f"{report.events:,} events", danger=True))
    return page("Prune old runs", join(parts))


def result_page(title: str, text: str, back: str) -> Markup:
    """What a write did, with a link back."""
    return page(title, join([tag("p", {"class": "preview"}, text), tag("p", None, tag("a", {"href": back},
                                                                                      "← back"))]))
