"""Who may do what: the auth context, agent access and memory scopes, as Better Agent checks them.

The rules are those of Better Agent's handler (``handler.ts``, ``auth/runtime.ts``): an agent
is public unless the app has an auth resolver (then it needs an auth context) or it says
otherwise; thread routes need app auth and a scope; a thread or run of another scope answers
404, word for word as one that does not exist.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from .problems import Problem

__all__ = ["Access", "AuthResolver", "ScopeResolver", "default_scope"]

#: ``auth(environ)``: the request's auth context (``subject``, optional ``tenant``, ``scopes``,
#: ``claims``), or None when the request carries none (or a credential that does not verify).
AuthResolver = Callable[[Dict[str, Any]], Optional[Mapping[str, Any]]]
#: ``scope(auth, environ, agent_name)``: the memory scope of that caller for that agent.
ScopeResolver = Callable[[Mapping[str, Any], Dict[str, Any], str], Optional[str]]


def default_scope(auth: Mapping[str, Any]) -> str:
    """Better Agent's default scope: ``tenant:<tenant>:subject:<subject>``, or ``subject:<subject>``."""
    tenant = auth.get("tenant")
    if tenant:
        return f"tenant:{tenant}:subject:{auth['subject']}"
    return f"subject:{auth['subject']}"


def unauthorized() -> Problem:
    """The 401 problem (no auth context where one is needed)."""
    return Problem("UNAUTHORIZED", "Authentication required.")


def forbidden(detail: str = "Forbidden.") -> Problem:
    """The 403 problem."""
    return Problem("FORBIDDEN", detail)


def run_not_found(run_id: str, **context: str) -> Problem:
    """The 404 of a run that does not exist, or is not the caller's to see."""
    return Problem("NOT_FOUND", f"Run '{run_id}' not found.", context={"runId": run_id, **context})


class Access:
    """The checks of one app: its auth resolver, scope resolver and agents."""

    def __init__(self, auth: Optional[AuthResolver], scope: Optional[ScopeResolver],
                 agents: Mapping[str, Any], has_memory: bool = True) -> None:
        self._auth = auth
        self._scope = scope
        self.agents = agents
        #: Whether the storage keeps memory (threads, messages): Better Agent's agent memory.
        self.has_memory = has_memory

    @property
    def has_app_auth(self) -> bool:
        """Whether the app has an auth resolver (Better Agent's ``config.auth``)."""
        return self._auth is not None

    def resolve(self, environ: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The request's auth context, or None (also without an auth resolver)."""
        if self._auth is None:
            return None
        auth = self._auth(environ)
        if auth is None:
            return None
        if not isinstance(auth, Mapping) or not isinstance(auth.get("subject"), str) or not auth["subject"]:
            raise TypeError(f"the auth resolver must return None or a dict with a non-empty string "
                            f"'subject', got {auth!r:.80}")
        tenant = auth.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise TypeError(f"the auth context's 'tenant' must be a string, got {tenant!r:.80}")
        return dict(auth)

    def agent(self, name: str) -> Any:
        """The agent `name` (its callable, or None for one served without a Python runner).

        :raises Problem: 404, as Better Agent answers an unknown agent.
        """
        if name not in self.agents:
            raise Problem("NOT_FOUND", f"Agent '{name}' not found.",
                          context={"agentName": name, "availableAgents": list(self.agents)})
        return self.agents[name]

    def check_agent(self, name: str, auth: Optional[Mapping[str, Any]], environ: Dict[str, Any]) -> None:
        """Refuse a caller the agent does not admit: 401 without auth, else 403.

        An agent's ``access`` attribute decides: ``"public"``, ``"authenticated"`` or
        ``access(auth, environ, agent_name) -> bool``; without one it is ``"authenticated"``
        when the app has auth, else ``"public"``.
        """
        access: Any = getattr(self.agent(name), "access", None)
        if access is None:
            access = "authenticated" if self.has_app_auth else "public"
        if access == "public":
            return
        allowed = bool(auth) if access == "authenticated" else bool(access(auth, environ, name))
        if allowed:
            return
        raise unauthorized() if not auth else forbidden()

    def memory_scope(self, name: str, auth: Optional[Mapping[str, Any]], environ: Dict[str, Any]) -> str:
        """The caller's memory scope for agent `name` (app auth and an auth context needed)."""
        if not self.has_app_auth:
            raise forbidden("Remote memory requires app auth to be configured.")
        if not auth:
            raise unauthorized()
        scope = self._scope(auth, environ, name) if self._scope is not None else default_scope(auth)
        if not scope:
            raise forbidden("Agent auth scope could not be resolved for this request.")
        if not isinstance(scope, str):
            raise TypeError(f"the scope resolver must return a string, got {scope!r:.80}")
        return scope

    def lookup_scope(self, name: str, auth: Optional[Mapping[str, Any]],
                     environ: Dict[str, Any]) -> Optional[str]:
        """The scope in which "the agent's latest running run" is looked up (None: any)."""
        if not self.has_app_auth:
            return None
        return self.run_scope(name, auth, environ)

    def run_scope(self, name: str, auth: Optional[Mapping[str, Any]], environ: Dict[str, Any]) -> str:
        """The caller's scope for the runs of agent `name`: its memory scope, or without memory
        the default scope."""
        if self.has_memory:
            return self.memory_scope(name, auth, environ)
        if not auth:
            raise unauthorized()
        return default_scope(auth)

    @staticmethod
    def visible_thread(thread: Optional[Dict[str, Any]], thread_id: str, agent_name: str,
                       scope: str) -> Dict[str, Any]:
        """`thread` when it is the agent's and in `scope`; else the 404 of a missing thread."""
        if thread is None or thread.get("agentName") != agent_name or thread.get("scope") != scope:
            raise Problem("NOT_FOUND", f"Thread '{thread_id}' not found.",
                          context={"threadId": thread_id, "agentName": agent_name})
        return thread

    def check_run(self, record: Optional[Dict[str, Any]], run_id: str,
                  auth: Optional[Mapping[str, Any]], environ: Dict[str, Any]) -> None:
        """Refuse a run the caller may not see (Better Agent's ``requireRunAccess``).

        Without app auth anyone may; with it an auth context is needed, the run must exist,
        and a run with a scope must be in the caller's scope for its agent.
        """
        if not self.has_app_auth:
            return
        if not auth:
            raise unauthorized()
        if record is None:
            raise run_not_found(run_id)
        if not record.get("scope"):
            return
        agent_name = record["agentName"]
        self.agent(agent_name)
        if record["scope"] != self.run_scope(agent_name, auth, environ):
            raise run_not_found(run_id)
