"""An agent's threads, and a thread: its conversation by role, its state, its runs in between."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from .layout import Context, badge, link, page, pretty, table
from .markup import Markup, duration, href, iso, join, tag
from .queries import MESSAGES_PAGE, PAGE, TITLE_SCAN, Reader, RunRow, SearchCursor

__all__ = ["threads_page", "thread_page", "NotFound"]


class NotFound(Exception):
    """A page for something that does not exist (answered 404)."""


def threads_page(reader: Reader, ctx: Context, agent: str, q: str, before: Optional[Tuple[int, str]],
                 after_id: str = "", titles: bool = False) -> Markup:
    """GET /agents/<agent>/threads?q=&before_at=&before_id= (a search goes on with after_id=, or
    titles=1 and before_at=&before_id=)"""
    search = tag("form", {"method": "get", "class": "filters"},
                 tag("label", None, "id or title prefix ",
                     tag("input", {"name": "q", "value": q, "type": "search", "autofocus": True})),
                 tag("button", {"type": "submit"}, "Search"))
    more_query: Dict[str, Any] = {}
    if q:
        cursor = (SearchCursor(after_id=after_id) if after_id else
                  SearchCursor(titles=True, before=before) if titles or before is not None else None)
        found, nxt = reader.search_threads(agent, q, cursor)
        if nxt is not None:
            more_query = ({"after_id": nxt.after_id} if nxt.after_id is not None else
                          {"titles": 1, "before_at": nxt.before and nxt.before[0],
                           "before_id": nxt.before and nxt.before[1]})
        note = tag("p", {"class": "muted"},
                   "Threads whose id starts with it (in id order), then those whose title does "
                   f"(any case; among up to {TITLE_SCAN:,} threads per page, newest first).")
    else:
        found = reader.threads(agent, before)
        if len(found) == PAGE:
            more_query = {"before_at": found[-1]["updatedAt"], "before_id": found[-1]["id"]}
        note = None
    rows = [(link(t.get("title") or "(untitled)", "threads", t["id"]), tag("code", None, t["id"]),
             iso(t.get("updatedAt")), iso(t.get("createdAt")), t.get("scope") or "") for t in found]
    more = tag("a", {"href": href("agents", agent, "threads", q=q, **more_query),
                     "class": "more", "rel": "next"}, "More threads →" if q else "Older threads →") \
        if more_query else None
    body = join([tag("p", None, link("Runs of this agent", "runs", agent=agent)), search, note,
                 table(["title", "id", "updated (UTC)", "created (UTC)", "scope"], rows,
                       empty="No thread matches." if q else "No threads.", class_="threads"), more])
    return page(f"Threads of {agent}", body)


def thread_page(reader: Reader, ctx: Context, thread_id: str, before: Optional[Tuple[int, str]]) -> Markup:
    """GET /threads/<id>?before_at=&before_id="""
    thread = reader.storage.memory.threads.get(thread_id)
    if thread is None:
        raise NotFound(f"Thread {thread_id!r} not found.")
    messages = reader.messages(thread_id, before)
    full = len(messages) == MESSAGES_PAGE
    since = messages[0]["createdAt"] if messages and full else None
    if not messages and before is not None:
        since = before[0]
    runs = reader.thread_runs(thread_id, since)
    if before is not None:
        runs = [r for r in runs if r.started_at <= before[0]]
    agent = thread.get("agentName")
    facts = table(["agent", "scope", "created (UTC)", "updated (UTC)", "id"], [(
        link(agent, "agents", agent, "threads") if agent else "", thread.get("scope") or "",
        iso(thread.get("createdAt")), iso(thread.get("updatedAt")), tag("code", None, thread_id))])
    older = tag("a", {"href": href("threads", thread_id, before_at=messages[0]["createdAt"],
                                   before_id=messages[0]["key"]), "class": "more", "rel": "prev"},
                "← Older messages") if full else None
    state = [tag("details", {"class": "state", "open": True}, tag("summary", None, "State"),
                 pretty(thread["state"])) if "state" in thread else None,
             tag("details", {"class": "state"}, tag("summary", None, "Metadata"),
                 pretty(thread["metadata"])) if "metadata" in thread else None]
    body = join([facts, join(state), tag("h2", None, "Conversation"), older,
                 tag("ol", {"class": "conversation"}, _conversation(messages, runs)) if messages or runs
                 else tag("p", {"class": "muted empty"}, "No messages.")])
    return page(thread.get("title") or thread_id, body)


def _conversation(messages: List[Dict[str, Any]], runs: List[RunRow]) -> Markup:
    """Messages and runs by time; a run comes before the messages it wrote."""
    items: List[Tuple[int, int, Any]] = [(r.started_at, 0, r) for r in runs]
    items += [(m["createdAt"] or 0, 1, m) for m in messages]
    items.sort(key=lambda item: (item[0], item[1]))
    out = []
    for _, kind, item in items:
        out.append(_run_divider(item) if kind == 0 else _message(item))
    return join(out)


def _run_divider(run: RunRow) -> Markup:
    return tag("li", {"class": "run-divider", "data-run": run.run_id},
               "run ", link(run.run_id, "runs", run.run_id), " ", badge(run.status), " ",
               tag("span", {"class": "muted"}, f"{iso(run.started_at)} UTC",
                   f" · {duration(run.duration_ms)}" if run.duration_ms is not None else " · running"))


def _message(row: Dict[str, Any]) -> Markup:
    message = row["message"]
    role = str(message.get("role") or "unknown")
    parts: List[Any] = [_content(message.get("content"))]
    for call in message.get("toolCalls") or []:
        parts.append(_tool_call(call))
    head = [tag("span", {"class": "role"}, role), " ", tag("span", {"class": "muted"}, iso(row["createdAt"]))]
    if role == "tool":
        call_id = message.get("toolCallId", "?")
        head.append(tag("span", {"class": "muted"}, f" · result of tool call {call_id}"))
    extra = {k: v for k, v in message.items() if k not in _SHOWN}
    if extra:
        parts.append(tag("details", None, tag("summary", None, "more fields"), pretty(extra)))
    kind = "tool-result" if role == "tool" else role
    return tag("li", {"class": f"message m-{kind}", "data-role": role}, tag("div", {"class": "head"}, head),
               join(parts))


_SHOWN = ("id", "role", "content", "toolCalls", "toolCallId")


def _content(content: Any) -> Markup:
    if content is None or content == "":
        return Markup("")
    if isinstance(content, str):
        return tag("div", {"class": "text"}, content)
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(tag("div", {"class": "text"}, part["text"]))
            else:
                out.append(pretty(part))
        return join(out)
    return pretty(content)


def _tool_call(call: Any) -> Markup:
    if not isinstance(call, dict):
        return pretty(call)
    function: Dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
    name = function.get("name") or call.get("name") or "?"
    arguments = function.get("arguments", call.get("arguments"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return tag("div", {"class": "tool-call"}, tag("span", {"class": "role"}, "tool call"), " ",
               tag("code", None, name), " ", tag("span", {"class": "muted"}, call.get("id") or ""),
               pretty(arguments))
