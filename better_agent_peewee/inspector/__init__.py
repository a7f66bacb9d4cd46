"""``better-agent-peewee inspect``: a local web inspector for threads, runs and live streams.

    from better_agent_peewee.inspector import inspector_app, serve
    app = inspector_app(storage)                 # a WSGI app: mount it anywhere
    serve(storage, host="127.0.0.1", port=8765)  # or serve it with the standard library

Pages are rendered on the server from bounded index lookups (see `queries`), with every
stored string escaped; the stylesheet, the one small script and the charts (inline SVG) ship
inside the package: nothing is fetched from anywhere. Read-only unless `allow_writes`.
See docs/inspector.md.
"""
from __future__ import annotations

import logging
import socketserver
from typing import Any, Dict, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .app import ASSETS, Inspector, is_loopback

logger = logging.getLogger(__name__)

__all__ = ["inspector_app", "serve", "make_inspector_server", "Inspector", "ASSETS", "is_loopback"]


def inspector_app(storage: Any, *, allow_writes: bool = False, token: Optional[str] = None,
                  stale_after_ms: int = 300_000) -> Inspector:
    """The inspector as a WSGI application over `storage`.

    :param allow_writes: serve the abort, reap and prune actions (else every write answers 403).
    :param token: required on every request (``?token=`` once, then a cookie; or ``Authorization:
        Bearer``). Without one, only requests addressed to a loopback host name are answered.
    :param stale_after_ms: a running run not updated for this long is flagged as looking stale.
    """
    return Inspector(storage, allow_writes=allow_writes, token=token, stale_after_ms=stale_after_ms)


class _Handler(WSGIRequestHandler):
    """wsgiref's handler, quiet (access lines go to logging) and giving the raw request path."""

    def get_environ(self) -> Dict[str, Any]:
        environ: Dict[str, Any] = super().get_environ()
        environ["RAW_URI"] = self.path  # so an id holding %2F stays one path segment
        return environ

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        logger.debug("%s %s", self.address_string(), format % args)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request: an open live view holds one (its stream holds no connection)."""

    daemon_threads = True
    request_queue_size = 64


def make_inspector_server(app: Inspector, host: str = "127.0.0.1", port: int = 8765,
                          token: Optional[str] = None) -> WSGIServer:
    """A threaded standard-library server for `app`, bound but not yet serving.

    :raises ValueError: a host that is not loopback without a token.
    """
    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} is reachable from other machines: pass --token as well "
                         f"(or bind 127.0.0.1)")
    return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_Handler)


def serve(storage: Any, host: str = "127.0.0.1", port: int = 8765, *, allow_writes: bool = False,
          token: Optional[str] = None) -> None:
    """Serve the inspector until interrupted (the command line's ``inspect``)."""
    server = make_inspector_server(inspector_app(storage, allow_writes=allow_writes, token=token),
                                   host, port, token)
    with server:
        server.serve_forever()
