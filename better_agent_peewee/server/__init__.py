"""Better Agent's HTTP routes as a WSGI application: its official client works against Python.

    from better_agent_peewee.server import wsgi_app
    app = wsgi_app(storage, agents={"support": support_agent}, auth=auth_from_cookie)

See docs/server.md for the routes, the agents, auth and scopes, and how to serve it.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Mapping, Optional

from .app import App
from .auth import AuthResolver, ScopeResolver, default_scope
from .problems import Problem
from .running import RunRequest
from .wire import MAX_BODY_BYTES

__all__ = ["wsgi_app", "App", "RunRequest", "Problem", "default_scope", "MAX_BODY_BYTES"]


def wsgi_app(storage: Any, *, agents: Optional[Mapping[str, Any]] = None, auth: Optional[AuthResolver] = None,
             scope: Optional[ScopeResolver] = None, base_path: str = "", abort_on_disconnect: bool = True,
             heartbeat: float = 15.0, max_body_bytes: int = MAX_BODY_BYTES,
             executor: Optional[Executor] = None) -> App:
    """A WSGI application serving Better Agent's routes over `storage` (stdlib only).

    :param agents: agent name -> ``agent(run, request)``: `run` is the run's `TrackedRun`,
        `request` a `RunRequest`; it emits events, appends messages and returns the result
        dict (``finishReason``, ``usage``, ``stepCount``) or None. A name mapped to None is
        served for its threads, streams and aborts only (its runs start elsewhere).
    :param auth: ``auth(environ)`` -> the auth context (``{"subject", "tenant"?, ...}``) or
        None. Without it agents are public and the thread routes answer 403, as in Better Agent.
    :param scope: ``scope(auth, environ, agent_name)`` -> the caller's memory scope; default
        ``subject:<subject>`` or ``tenant:<tenant>:subject:<subject>``.
    :param base_path: where the routes live (``"/api/agents"``), below the WSGI SCRIPT_NAME.
    :param abort_on_disconnect: abort a streamed run when its client goes away.
    :param heartbeat: seconds between ``:`` comments on a quiet SSE response.
    :param max_body_bytes: a larger request body is answered 413.
    :param executor: where streamed runs execute (default: a thread each).
    """
    return App(storage, agents=agents, auth=auth, scope=scope, base_path=base_path,
               abort_on_disconnect=abort_on_disconnect, heartbeat=heartbeat,
               max_body_bytes=max_body_bytes, executor=executor)
