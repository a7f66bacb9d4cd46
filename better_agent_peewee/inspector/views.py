"""Which page a URL is, its query string checked: bad input is a 400 page naming what is wrong."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl

from ..errors import NotFoundError
from ..records import RUN_STATUSES
from ..timestamps import now_ms, parse_duration, parse_iso_ms
from .conversation import NotFound, thread_page, threads_page
from .layout import Response, page
from .markup import href, tag
from .overview import overview
from .runs_pages import RunFilter, prune_page, result_page, run_page, runs_page

if TYPE_CHECKING:  # (the app imports this module)
    from .app import Inspector

__all__ = ["Views", "BadRequest"]

#: The most a write form may send.
MAX_FORM_BYTES = 4096


class BadRequest(ValueError):
    """A query string or form the inspector cannot read (answered 400, naming the field)."""


class Views:
    """The inspector's pages and writes, given its app (storage, reader, settings)."""

    def __init__(self, app: Inspector) -> None:
        self.app = app

    def read(self, segments: List[str], query: Dict[str, str]) -> Response:
        """The response to a GET."""
        app, reader = self.app, self.app.reader
        ctx = app.context(now_ms())
        try:
            if segments in ([""], []):
                return app.html(200, overview(reader, ctx))
            if len(segments) == 3 and segments[0] == "agents" and segments[2] == "threads" and segments[1]:
                return app.html(200, threads_page(reader, ctx, segments[1], query.get("q", "").strip(),
                                                  _before(query), query.get("after_id", ""),
                                                  query.get("titles") == "1"))
            if len(segments) == 2 and segments[0] == "threads" and segments[1]:
                return app.html(200, thread_page(reader, ctx, segments[1], _before(query)))
            if segments == ["runs"]:
                return app.html(200, runs_page(reader, ctx, _run_filter(query), _before(query)))
            if len(segments) == 2 and segments[0] == "runs" and segments[1]:
                return app.html(200, run_page(reader, ctx, segments[1], _int(query, "after", 0)))
            if segments == ["prune"]:
                return self._prune_preview(query)
        except BadRequest as exc:
            return app.html(400, page("Bad request", tag("p", {"class": "error"}, str(exc))))
        raise NotFound("No such page.")

    def _prune_preview(self, query: Dict[str, str]) -> Response:
        app = self.app
        refusal = app.write_refusal({}, None) if not app.allow_writes else None
        if refusal is not None:
            return refusal
        older_than = query.get("older_than", "").strip()
        report, error = None, None
        if older_than:
            try:
                report = app.storage.runs.prune(parse_duration(older_than), dry_run=True)
            except ValueError as exc:
                error = str(exc)
        return app.html(400 if error else 200, prune_page(app.context(now_ms()), older_than, report, error))

    def write(self, environ: Dict[str, Any], segments: List[str]) -> Response:
        """The response to a POST: 403 unless writes are on and the CSRF token matches."""
        app = self.app
        form = _form(environ)
        refusal = app.write_refusal(environ, form.get("csrf"))
        if refusal is not None:
            return refusal
        try:
            if len(segments) == 3 and segments[0] == "runs" and segments[2] == "abort":
                try:
                    app.storage.runs.request_abort(segments[1])
                except NotFoundError:
                    raise NotFound(f"Run {segments[1]!r} not found.") from None
                return _see_other(href("runs", segments[1]))
            if segments == ["reap"]:
                reaped = app.storage.runs.reap_stale(_duration(form, "stale_after"))
                done = result_page("Stale runs reaped", f"Marked {reaped} stale runs failed.", "/")
                return app.html(200, done)
            if segments == ["prune"]:
                report = app.storage.runs.prune(_duration(form, "older_than"))
                return app.html(200, result_page("Pruned", report.summary(), "/"))
        except BadRequest as exc:
            return app.html(400, page("Bad request", tag("p", {"class": "error"}, str(exc))))
        raise NotFound("No such action.")


def _see_other(location: str) -> Response:
    return Response(303, [b""], headers=[("Location", location)])


def _form(environ: Dict[str, Any]) -> Dict[str, str]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0 or length > MAX_FORM_BYTES:
        return {}
    body = environ["wsgi.input"].read(length).decode("utf-8", "replace")
    return dict(parse_qsl(body, keep_blank_values=True))


def _int(query: Dict[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"{name} must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def _before(query: Dict[str, str]) -> Optional[Tuple[int, str]]:
    if not query.get("before_at") and not query.get("before_id"):
        return None
    if not query.get("before_id"):
        raise BadRequest("before_at needs before_id (the key of the last row seen)")
    return _int(query, "before_at", 0), query["before_id"]


def _duration(form: Dict[str, str], name: str) -> Any:
    try:
        return parse_duration(form.get(name, ""))
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def _moment(text: str, name: str, now: int) -> Optional[int]:
    """``24h`` (that long ago) or an ISO date/time (UTC unless it says otherwise)."""
    text = text.strip()
    if not text:
        return None
    try:
        return now - int(parse_duration(text).total_seconds() * 1000)
    except ValueError:
        pass
    for candidate in (text, text + ":00", text + "T00:00:00"):
        try:
            return parse_iso_ms(candidate)
        except ValueError:
            continue
    raise BadRequest(f"{name} must be a duration (24h, 7d) or a UTC date and time "
                     f"(2026-12-01T09:00), got {text[:40]!r}")


def _run_filter(query: Dict[str, str]) -> RunFilter:
    status = query.get("status", "").strip()
    if status and status not in RUN_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(RUN_STATUSES)}, got {status[:40]!r}")
    now = now_ms()
    since, until = query.get("since", ""), query.get("until", "")
    return RunFilter(query.get("agent", "").strip(), status, _moment(since, "since", now),
                     _moment(until, "until", now), since.strip(), until.strip())
