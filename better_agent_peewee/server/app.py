"""The WSGI application: Better Agent's route table, dispatch, and errors as problem details."""
from __future__ import annotations

import http
import logging
from concurrent.futures import Executor
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from ..checks import is_int
from ..errors import DomainNotConfiguredError, NotFoundError, RecordError
from .auth import Access, AuthResolver, ScopeResolver
from .control import Control
from .problems import Problem, problem_of
from .routes import Threads
from .running import Runner
from .wire import MAX_BODY_BYTES, Reply, Request, problem_reply, release_connection, route_segments

logger = logging.getLogger(__name__)

__all__ = ["App"]

Handler = Callable[[Request, Dict[str, str]], Reply]


class App:
    """Better Agent's HTTP routes over a storage, as a WSGI application (see `wsgi_app`)."""

    def __init__(self, storage: Any, *, agents: Optional[Mapping[str, Any]] = None,
                 auth: Optional[AuthResolver] = None, scope: Optional[ScopeResolver] = None,
                 base_path: str = "", abort_on_disconnect: bool = True, heartbeat: float = 15.0,
                 max_body_bytes: int = MAX_BODY_BYTES, executor: Optional[Executor] = None) -> None:
        if not isinstance(base_path, str) or (base_path and not base_path.startswith("/")):
            raise ValueError(f"base_path must be '' or start with '/', got {base_path!r:.80}")
        if not is_int(heartbeat, or_float=True) or not heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r:.80}")
        if not is_int(max_body_bytes) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r:.80}")
        agents = dict(agents or {})
        for name, agent in agents.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"agent names must be non-empty strings without '/', got {name!r:.80}")
            if agent is not None and not callable(agent):
                raise ValueError(f"agent {name!r} must be callable as agent(run, request) or None, "
                                 f"got {type(agent).__name__}")
        self.storage = storage
        self.base = [s for s in base_path.split("/") if s]
        self.max_body_bytes = max_body_bytes
        self.access = Access(auth, scope, agents, "memory" in getattr(storage, "domains", ("memory",)))
        self.threads = Threads(storage, self.access)
        self.control = Control(storage, self.access, heartbeat)
        self.runner = Runner(storage, self.access, self.control, abort_on_disconnect, executor)
        self.routes: List[Tuple[str, Tuple[str, ...], Handler]] = [
            ("POST", ("runs", ":runId", "abort"), self.control.abort_run),
            ("GET", ("runs", ":runId", "stream"), self.control.stream_run),
            ("POST", (":name", "run"), self.runner.run),
            ("POST", (":name", "abort"), self.control.abort_agent_run),
            ("GET", (":name", "stream"), self.control.stream_agent_run),
            ("GET", (":name", "threads"), self.threads.list),
            ("POST", (":name", "threads"), self.threads.create),
            ("GET", (":name", "threads", ":threadId"), self.threads.get),
            ("PATCH", (":name", "threads", ":threadId"), self.threads.update),
            ("DELETE", (":name", "threads", ":threadId"), self.threads.delete),
            ("GET", (":name", "threads", ":threadId", "runtime"), self.threads.runtime),
            ("GET", (":name", "threads", ":threadId", "messages"), self.threads.messages),
        ]

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ, self.max_body_bytes)
        try:
            reply = self.dispatch(request)
        except Exception as exc:  # every error is answered as problem details
            reply = problem_reply(_problem(exc))
        finally:
            self._release()
        start_response(f"{reply.status} {_reason(reply.status)}", reply.headers)
        return reply.body

    def dispatch(self, request: Request) -> Reply:
        """The reply to `request`: its route's, or a 404 or 405 problem."""
        segments = route_segments(request.environ)
        path = "/" + "/".join(segments)
        if segments[:len(self.base)] != self.base or len(segments) == len(self.base) or "" in segments:
            raise Problem("NOT_FOUND", f"No route for {request.method} {path}.")
        segments = segments[len(self.base):]
        allowed: List[str] = []
        for method, pattern, handler in self.routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            if method == request.method:
                return handler(request, params)
            allowed.append(method)
        if not allowed:
            raise Problem("NOT_FOUND", f"No route for {request.method} {path}.")
        allow = ", ".join(sorted(set(allowed)))
        return problem_reply(Problem("METHOD_NOT_ALLOWED", f"{request.method} is not allowed on {path}; "
                                     f"allowed: {allow}."), [("Allow", allow)])

    def _release(self) -> None:
        """Give this thread's connection back (to the pool) between requests: an open SSE
        response holds none (the storage's poller reads for every follower)."""
        release_connection(self.storage)


def _match(pattern: Tuple[str, ...], segments: List[str]) -> Optional[Dict[str, str]]:
    if len(pattern) != len(segments):
        return None
    params: Dict[str, str] = {}
    for part, segment in zip(pattern, segments):
        if part.startswith(":"):
            params[part[1:]] = segment
        elif part != segment:
            return None
    return params


def _problem(exc: Exception) -> Problem:
    """A storage refusal as the client's fault (422 or 404); anything else as `problem_of` says."""
    if isinstance(exc, DomainNotConfiguredError):  # as Better Agent answers a storage area not configured
        return Problem("VALIDATION_FAILED", str(exc))
    if isinstance(exc, RecordError):
        return Problem("VALIDATION_FAILED", str(exc))
    if isinstance(exc, NotFoundError):
        return Problem("NOT_FOUND", str(exc))
    return problem_of(exc)


def _reason(status: int) -> str:
    if status == 499:
        return "Client Closed Request"
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
