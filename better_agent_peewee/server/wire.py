"""The HTTP side of the server: reading a WSGI request, writing JSON, problems and SSE frames."""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import parse_qsl, unquote_to_bytes

from .problems import Problem

__all__ = ["MAX_BODY_BYTES", "HEARTBEAT_FRAME", "SSE_HEADERS", "Reply", "Request", "dumps", "error_frame",
           "event_frame", "js_number", "json_reply", "no_content", "problem_reply",
           "release_connection"]

#: The largest request body read, in bytes; a larger one is answered 413.
MAX_BODY_BYTES = 1024 * 1024
#: The frame sent while a stream is quiet (a bare comment, as Better Agent's server sends).
HEARTBEAT_FRAME = b":\n\n"
#: Headers of every SSE response (Better Agent's, less ``connection``, which WSGI forbids).
SSE_HEADERS: List[Tuple[str, str]] = [("Content-Type", "text/event-stream"),
                                      ("Cache-Control", "no-cache, no-transform"),
                                      ("X-Accel-Buffering", "no")]
_JSON_TYPE = re.compile(r"^application/([a-z0-9.+-]*\+)?json", re.IGNORECASE)


class Reply(NamedTuple):
    """A response: status code, headers and the body's chunks."""

    status: int
    headers: List[Tuple[str, str]]
    body: Iterable[bytes]


def dumps(value: Any) -> str:
    """`value` as JavaScript's ``JSON.stringify`` writes it (compact, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_reply(value: Any, status: int = 200) -> Reply:
    """A JSON response (``Response.json`` of the TypeScript server)."""
    body = dumps(value).encode("utf-8", "surrogatepass")
    return Reply(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], [body])


def problem_reply(problem: Problem, headers: Iterable[Tuple[str, str]] = ()) -> Reply:
    """The ``application/problem+json`` response of `problem`."""
    body = dumps(problem.details()).encode("utf-8", "surrogatepass")
    return Reply(problem.status, [("Content-Type", "application/problem+json"),
                                  ("Content-Length", str(len(body))), *headers], [body])


def no_content() -> Reply:
    """204, no body."""
    return Reply(204, [], [])


def event_frame(event: Mapping[str, Any], with_id: bool) -> bytes:
    """One event as an SSE frame: ``id: <seq>`` (when asked and present) and ``data: <JSON>``."""
    seq = event.get("seq")
    head = f"id: {seq}\n" if with_id and type(seq) is int else ""
    return f"{head}data: {dumps(event)}\n\n".encode("utf-8", "surrogatepass")


def error_frame(problem: Problem) -> bytes:
    """The ``event: error`` frame whose data is `problem`'s details."""
    return f"event: error\ndata: {dumps(problem.details())}\n\n".encode("utf-8", "surrogatepass")


def js_number(text: Optional[str]) -> Optional[float]:
    """`text` read as JavaScript's ``Number(text)`` does; None where that is not finite.

    ``Number(null)`` and ``Number("")`` are 0; surrounding white space is ignored; ``0x``,
    ``0o`` and ``0b`` prefixes are read; anything else unreadable is NaN (None here).
    """
    if text is None:
        return 0.0
    text = text.strip()
    if not text:
        return 0.0
    if not text.isascii() or "_" in text:
        return None  # (Python reads other scripts' digits and 1_000; JavaScript does not)
    try:
        if text[:2].lower() in ("0x", "0o", "0b"):
            return float(int(text, 0))
        if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text):
            return None  # (Python's float() would also take "nan", "inf", "1_0")
        value = float(text)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def release_connection(storage: Any) -> None:
    """Give this thread's connection of `storage` back (to the pool, when pooled) between
    requests, unless a transaction holds it: an idle request thread keeps none."""
    db = getattr(storage, "database", None)
    if db is not None and not db.is_closed() and not db.in_transaction():
        db.close()


def _decode(segment: str) -> str:
    """A raw path segment percent-decoded as UTF-8 (kept raw when that fails, as the TS router)."""
    try:
        return unquote_to_bytes(segment.encode("latin-1")).decode("utf-8")
    except (UnicodeError, ValueError):
        return segment


def _latin1_to_text(value: str) -> str:
    """A WSGI "bytes as latin-1" string as the UTF-8 text it carries."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def route_segments(environ: Mapping[str, Any]) -> List[str]:
    """The path below SCRIPT_NAME as decoded segments, ``%2F`` kept inside its segment.

    PATH_INFO is decoded already (``a%2Fb`` reads as two segments), so the raw request URI
    (``RAW_URI``, ``REQUEST_URI``: werkzeug, gunicorn) is split first when the server gives
    one that matches; otherwise PATH_INFO is used.
    """
    path_info = _latin1_to_text(environ.get("PATH_INFO", "") or "")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        raw_path = str(raw).split("?", 1)[0].split("#", 1)[0]
        if "://" in raw_path:
            raw_path = "/" + raw_path.split("://", 1)[1].partition("/")[2]
        raw_segments = raw_path.split("/")
        decoded = [_decode(s) for s in raw_segments]
        script = _latin1_to_text(environ.get("SCRIPT_NAME", "") or "").rstrip("/")
        skip = len(script.split("/"))
        if "/".join(decoded[:skip]) == script and "/" + "/".join(decoded[skip:]) == path_info:
            return decoded[skip:]
    return path_info.split("/")[1:] if path_info.startswith("/") else [""]


class Request:
    """What a route needs of a WSGI request."""

    def __init__(self, environ: Dict[str, Any], max_body: int = MAX_BODY_BYTES) -> None:
        self.environ = environ
        self.method: str = str(environ.get("REQUEST_METHOD", "GET")).upper()
        query = _latin1_to_text(environ.get("QUERY_STRING", "") or "")
        self._query: Dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            self._query.setdefault(key, value)  # the first, as URLSearchParams.get
        self._max_body = max_body
        self._body: Optional[bytes] = None

    def param(self, name: str) -> Optional[str]:
        """The first value of the query parameter `name`, or None."""
        return self._query.get(name)

    def header(self, name: str) -> Optional[str]:
        """The request header `name`, or None."""
        key = name.upper().replace("-", "_")
        value = self.environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key)
        return None if value is None else _latin1_to_text(str(value))

    def wants_event_stream(self) -> bool:
        """The request accepts ``text/event-stream`` (then a run is answered as SSE)."""
        return "text/event-stream" in (self.header("Accept") or "")

    def raw_body(self) -> bytes:
        """The request body (at most the limit: a larger one is a 413 problem)."""
        if self._body is None:
            self._body = self._read()
        return self._body

    def _read(self) -> bytes:
        stream = self.environ.get("wsgi.input")
        length_text = (self.environ.get("CONTENT_LENGTH") or "").strip()
        too_large = Problem("PAYLOAD_TOO_LARGE",
                            f"The request body is larger than this server's limit of {self._max_body} bytes.",
                            context={"limit": self._max_body})
        if length_text:
            if not length_text.isdigit():
                raise Problem("BAD_REQUEST",
                              f"Content-Length must be a number of bytes, got {length_text!r:.40}.")
            length = int(length_text)
            if length > self._max_body:
                raise too_large
            return stream.read(length) if stream is not None and length else b""
        if stream is None or not self.environ.get("wsgi.input_terminated"):
            return b""  # no length and no end marker: reading could block for ever
        data: bytes = stream.read(self._max_body + 1)
        if len(data) > self._max_body:
            raise too_large
        return data

    def json_body(self) -> Any:
        """The body: parsed as JSON (also when no type is given), a dict of strings for a form;
        None when there is none or it is of another type.

        :raises Problem: 400 for JSON that does not parse, 413 for a body over the limit.
        """
        data = self.raw_body()
        content_type = (self.header("Content-Type") or "").strip().lower()
        if data and content_type.startswith("application/x-www-form-urlencoded"):
            return dict(parse_qsl(data.decode("utf-8", "replace"), keep_blank_values=True))
        if not data or (content_type and not _JSON_TYPE.match(content_type)):
            return None  # (the TS router reads other media types as text: no run input either)
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeError, ValueError) as exc:
            raise Problem("BAD_REQUEST", f"Invalid JSON in request body: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

