"""HTML built by functions that escape every value: a stored string never becomes markup.

`tag` escapes its text children and attribute values; only `Markup` (what `tag` itself
returns, and the few constant fragments written here) passes through as it is. URLs are
built by `href` from path segments, each percent-encoded, so a stored id can only ever be
one segment of one of our own paths (a ``javascript:`` id is a harmless relative path).
"""
from __future__ import annotations

import datetime as dt
import html
from typing import Any, Iterable, Mapping, Optional, Union
from urllib.parse import quote, urlencode

__all__ = ["Markup", "escape", "tag", "join", "href", "iso", "ago", "duration"]


class Markup(str):
    """Text that is already HTML (built by `tag` or written here): never escaped again."""


Child = Union[None, str, int, float, Markup, Iterable[Any]]


def escape(value: Any) -> Markup:
    """`value` as HTML text: Markup as it is, anything else escaped (quotes included)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def join(children: Iterable[Any]) -> Markup:
    """The children, each escaped unless Markup, one after the other (None and False left out)."""
    out = []
    for child in children:
        if isinstance(child, str):  # Markup is a str: kept; any other str escaped
            out.append(child if isinstance(child, Markup) else html.escape(child, quote=True))
        elif child is None or child is False:
            continue
        elif hasattr(child, "__iter__") and not isinstance(child, bytes):  # a list, a generator
            out.append(join(child))
        else:
            out.append(html.escape(str(child), quote=True))
    return Markup("".join(out))


_VOID = frozenset(("br", "hr", "input", "meta", "link", "img"))


def tag(name: str, attrs: Optional[Mapping[str, Any]] = None, *children: Any) -> Markup:
    """``<name attrs>children</name>``; attribute values and text children escaped.

    An attribute whose value is None or False is left out; True writes it bare. A trailing
    underscore in a name is dropped (``class_``), other underscores become dashes (``data_seq``).
    """
    parts = [name]
    for key, value in (attrs or {}).items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{escape(value)}"')
    head = "<" + " ".join(parts) + ">"
    if name in _VOID:
        return Markup(head)
    return Markup(f"{head}{join(children)}</{name}>")


def href(*segments: Any, **query: Any) -> str:
    """``/seg/seg?k=v``: each segment percent-encoded whole (``/`` too), empty query values left out."""
    path = "/" + "/".join(quote(str(s), safe="") for s in segments)
    pairs = [(k.rstrip("_"), str(v)) for k, v in query.items() if v is not None and v != ""]
    return path + ("?" + urlencode(pairs) if pairs else "")


def iso(ms: Optional[int]) -> str:
    """``2026-12-04 18:40:02`` (UTC) for epoch ms, or an empty string."""
    if ms is None:
        return ""
    stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def duration(ms: Optional[float]) -> str:
    """A duration a person reads at a glance: ``850 ms``, ``12.3 s``, ``4 min 2 s``, ``3 h 5 min``."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def ago(ms: Optional[int], now: int) -> str:
    """``3 min ago`` for epoch ms before `now`."""
    if ms is None:
        return ""
    return f"{duration(max(now - ms, 0))} ago"
