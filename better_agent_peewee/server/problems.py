"""Problem details (RFC 7807) as Better Agent's server writes them: one exception, one body shape."""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, NamedTuple, Optional

import peewee

from ..errors import ConnectionLostError, PoolExhaustedError, RunAborted

logger = logging.getLogger(__name__)

__all__ = ["Problem", "problem_of", "TYPE_BASE"]

#: Where a problem's ``type`` points, as Better Agent's errors do (plus ``#<slug>``).
TYPE_BASE = "https://better-agent.com/docs/concepts/errors"


class _Meta(NamedTuple):
    status: int
    title: str
    retryable: bool


#: Better Agent's codes with their status, title and retryability; the last four are the
#: ones its auth checks and this server add with an explicit status.
CODES: Dict[str, _Meta] = {
    "BAD_REQUEST": _Meta(400, "Bad Request", False),
    "NOT_FOUND": _Meta(404, "Not Found", False),
    "CONFLICT": _Meta(409, "Conflict", False),
    "VALIDATION_FAILED": _Meta(422, "Unprocessable Entity", False),
    "RATE_LIMITED": _Meta(429, "Too Many Requests", True),
    "TIMEOUT": _Meta(504, "Gateway Timeout", True),
    "ABORTED": _Meta(499, "Client Closed Request", False),
    "UPSTREAM_FAILED": _Meta(502, "Upstream Failed", True),
    "INTERNAL": _Meta(500, "Internal Server Error", False),
    "UNAUTHORIZED": _Meta(401, "Unauthorized", False),
    "FORBIDDEN": _Meta(403, "Forbidden", False),
    "METHOD_NOT_ALLOWED": _Meta(405, "Method Not Allowed", False),
    "PAYLOAD_TOO_LARGE": _Meta(413, "Payload Too Large", False),
    "SERVICE_UNAVAILABLE": _Meta(503, "Service Unavailable", True),
    "STALE_RUN": _Meta(503, "Run worker presumed dead", True),
}


class Problem(Exception):
    """An error answered as ``application/problem+json`` with Better Agent's fields.

    Raise it from an agent, an auth resolver or a scope resolver to answer with that code:
    ``raise Problem("FORBIDDEN", "Only admins may run this agent.")``. A code Better Agent
    knows gets its status and title; another one gets `status` (default 500).
    """

    def __init__(self, code: str, detail: str, *, status: Optional[int] = None,
                 title: Optional[str] = None, context: Optional[Mapping[str, Any]] = None,
                 retryable: Optional[bool] = None) -> None:
        super().__init__(detail)
        meta = CODES.get(code) or _Meta(500, "Internal Server Error", False)
        self.code = code
        self.detail = detail
        self.status = meta.status if status is None else int(status)
        self.title = meta.title if title is None else title
        self.retryable = meta.retryable if retryable is None else bool(retryable)
        self.context = dict(context) if context else None

    def details(self) -> Dict[str, Any]:
        """The problem details body: type, title, status, detail, code, retryable, context."""
        body: Dict[str, Any] = {"type": f"{TYPE_BASE}#{self.code.lower().replace('_', '-')}",
                                "title": self.title, "status": self.status, "detail": self.detail,
                                "code": self.code, "retryable": self.retryable}
        if self.context:
            body["context"] = self.context
        return body


def problem_of(exc: BaseException) -> Problem:
    """`exc` as a Problem: itself, an abort (499), a database that cannot serve now (503: lost,
    refusing connections, pool exhausted, a lock timeout), else INTERNAL (500).

    An exception with a string ``code`` attribute keeps that code, as Better Agent wraps errors.
    """
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, RunAborted):
        return Problem("ABORTED", str(exc) or "Run aborted.")
    if isinstance(exc, (ConnectionLostError, PoolExhaustedError, peewee.OperationalError)):
        logger.warning("answered 503: %s", exc)
        return Problem("SERVICE_UNAVAILABLE", "The database cannot be reached now; try again.")
    code = getattr(exc, "code", None)
    logger.error("request failed: %s", exc, exc_info=exc)
    detail = str(exc) or type(exc).__name__
    if isinstance(code, str) and code:
        return Problem(code, detail)
    return Problem("INTERNAL", detail)
