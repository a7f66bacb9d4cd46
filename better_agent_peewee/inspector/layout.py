"""The page frame, and small pieces every page uses (tables, JSON, status badges, forms)."""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .markup import Markup, escape, href, join, tag

__all__ = ["page", "table", "pretty", "badge", "link", "count", "form", "field", "Context", "Response"]


class Context:
    """What a page needs besides the data: now, whether writes are on, the CSRF token."""

    def __init__(self, now_ms: int, allow_writes: bool, csrf: str, stale_after_ms: int) -> None:
        self.now_ms = now_ms
        self.allow_writes = allow_writes
        self.csrf = csrf
        self.stale_after_ms = stale_after_ms


class Response:
    """Status, headers and body of one answer."""

    def __init__(self, status: int, body: Iterable[bytes], content_type: str = "text/html; charset=utf-8",
                 headers: Optional[List[Tuple[str, str]]] = None) -> None:
        self.status, self.body = status, body
        self.headers = [("Content-Type", content_type), *(headers or [])]


def page(title: str, body: Any, *, active: str = "", notice: Optional[str] = None) -> Markup:
    """A whole HTML document: header with navigation, then `body`."""
    nav = join(tag("a", {"href": url, "class": "active" if key == active else None}, label)
               for key, url, label in (("overview", "/", "Overview"), ("runs", "/runs", "Runs")))
    return Markup("<!doctype html>\n" + tag(
        "html", {"lang": "en"},
        tag("head", None,
            tag("meta", {"charset": "utf-8"}),
            tag("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
            tag("title", None, f"{title} · better-agent-peewee inspector"),
            tag("link", {"rel": "icon", "href": "data:,"}),  # (no favicon request, no 404 in the console)
            tag("link", {"rel": "stylesheet", "href": "/assets/inspector.css"}),
            tag("script", {"src": "/assets/inspector.js", "defer": True})),
        tag("body", None,
            tag("header", None, tag("a", {"href": "/", "class": "brand"}, "better-agent-peewee"),
                tag("nav", None, nav)),
            tag("main", None,
                tag("p", {"class": "notice", "role": "status"}, notice) if notice else None,
                tag("h1", None, title), body))))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "Nothing here yet.",
          **attrs: Any) -> Markup:
    """A table; each cell escaped unless it is Markup."""
    body = [tag("tr", None, *(tag("td", None, cell) for cell in row)) for row in rows]
    if not body:
        return tag("p", {"class": "muted empty"}, empty)
    return tag("table", attrs, tag("thead", None, tag("tr", None, *(tag("th", None, h) for h in headers))),
               tag("tbody", None, *body))


def pretty(value: Any) -> Markup:
    """`value` as indented JSON in a <pre>."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return tag("pre", {"class": "json"}, text)


def badge(status: Optional[str], extra: str = "") -> Markup:
    """A status as a coloured label."""
    return tag("span", {"class": f"badge s-{status or 'none'} {extra}".strip()}, status or "—")


def link(text: Any, *segments: Any, **query: Any) -> Markup:
    """A link to one of our pages."""
    return tag("a", {"href": href(*segments, **query)}, text)


def count(n: int, cap: int) -> str:
    """``1,234``, or ``1,000+`` when the count stopped at its cap."""
    return f"{cap:,}+" if n > cap else f"{n:,}"


def form(action: str, csrf: str, fields: List[Markup], submit: str, *, danger: bool = False,
         method: str = "post") -> Markup:
    """A write form: posts its fields with the CSRF token."""
    hidden = tag("input", {"type": "hidden", "name": "csrf", "value": csrf}) if method == "post" else None
    return tag("form", {"method": method, "action": action, "class": "write"}, hidden, *fields,
               tag("button", {"type": "submit", "class": "danger" if danger else None}, submit))


def field(label: str, name: str, value: str = "", **attrs: Any) -> Markup:
    """A labelled input."""
    values: Dict[str, Any] = {"name": name, "value": value, **attrs}
    return tag("label", None, label, " ", tag("input", values))


def escape_all(values: Iterable[Any]) -> List[Markup]:
    """Each value escaped."""
    return [escape(v) for v in values]
