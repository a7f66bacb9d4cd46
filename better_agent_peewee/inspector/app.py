"""The inspector as a WSGI application: routes, the token, CSRF, assets and the mounted API."""
from __future__ import annotations

import hmac
import http
import ipaddress
import logging
import secrets
from importlib import resources
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qsl, quote

from ..errors import StorageError
from ..server import wsgi_app
from ..server.wire import release_connection, route_segments
from .conversation import NotFound
from .layout import Context, Response, page
from .markup import Markup, tag
from .queries import Reader
from .views import Views

logger = logging.getLogger(__name__)

__all__ = ["Inspector", "ASSETS", "is_loopback"]

#: The files under ``assets/`` the inspector serves, by name (read once: nothing else is served).
ASSETS: Dict[str, Tuple[str, bytes]] = {}
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
#: Every page forbids what it does not use: no inline script, nothing from elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
COOKIE = "bap_inspect"
SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                    ("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY")]


def _load_assets() -> None:
    if ASSETS:
        return
    for entry in resources.files(__package__).joinpath("assets").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            ASSETS[entry.name] = (_TYPES[suffix], entry.read_bytes())


_load_assets()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Inspector:
    """``inspector(environ, start_response)``: the pages, the writes when allowed, ``/api``, ``/assets``."""

    def __init__(self, storage: Any, *, allow_writes: bool = False, token: Optional[str] = None,
                 stale_after_ms: int = 300_000, heartbeat: float = 15.0) -> None:
        self.storage = storage
        self.reader = Reader(storage)
        self.allow_writes = bool(allow_writes)
        self.token = token or None
        self.csrf = secrets.token_urlsafe(24)  # per process: a page from before a restart cannot write
        self.stale_after_ms = int(stale_after_ms)
        self.api = wsgi_app(storage, agents={}, base_path="/api", heartbeat=heartbeat)
        self.views = Views(self)

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refusal = self._refuse(environ)
        if refusal is not None:
            return self._send(refusal, start_response)
        segments = route_segments(environ)
        if segments[:1] == ["api"]:
            if environ.get("REQUEST_METHOD", "GET").upper() not in ("GET", "HEAD"):
                refusal = self.write_refusal(environ, environ.get("HTTP_X_CSRF_TOKEN"))
                if refusal is not None:
                    return self._send(refusal, start_response)
            return self.api(environ, start_response)
        try:
            response = self._route(environ, segments)
        except NotFound as exc:
            response = self.html(404, page("Not found", tag("p", None, str(exc))))
        except StorageError as exc:
            logger.warning("inspector: %s", exc)
            response = self.html(503, page("Database unavailable", tag("p", {"class": "error"}, str(exc))))
        finally:
            self._release()
        return self._send(response, start_response)

    def _route(self, environ: Dict[str, Any], segments: List[str]) -> Response:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if segments[:1] == ["assets"] and len(segments) == 2 and method in ("GET", "HEAD"):
            asset = ASSETS.get(segments[1])
            if asset is None:
                return self.html(404, page("Not found", tag("p", None, "No such asset.")))
            return Response(200, [asset[1]], asset[0], [("Cache-Control", "no-cache")])
        query = dict(parse_qsl(environ.get("QUERY_STRING", "") or "", keep_blank_values=True))
        if method == "POST":
            return self.views.write(environ, segments)
        if method not in ("GET", "HEAD"):
            return self.html(405, page("Method not allowed", tag("p", None, f"{method} is not served here.")),
                             [("Allow", "GET, HEAD, POST")])
        return self.views.read(segments, query)

    def context(self, now_ms: int) -> Context:
        """What every page is told besides its data."""
        return Context(now_ms, self.allow_writes, self.csrf, self.stale_after_ms)

    def html(self, status: int, document: Markup,
             headers: Optional[List[Tuple[str, str]]] = None) -> Response:
        """An HTML response."""
        return Response(status, [document.encode("utf-8", "surrogatepass")], headers=headers)

    # -- who may ask ----------------------------------------------------------------------------

    def _refuse(self, environ: Dict[str, Any]) -> Optional[Response]:
        """A refusal for a request without the token, or (without one) to a Host that is not loopback:
        a page of another site cannot read this one through DNS rebinding."""
        if self.token is None:
            host = str(environ.get("HTTP_HOST") or "localhost")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                refused = tag("p", None, "This inspector answers to localhost only.")
                return self.html(403, page("Forbidden", refused))
            return None
        given = self._token_of(environ)
        if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            query = environ.get("QUERY_STRING", "") or ""
            if "token=" in query:  # set the cookie, then take the token out of the address bar
                rest = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"]
                # One leading slash (a path of "//host" would send the browser to another site),
                # under the prefix the inspector is mounted at.
                path = quote(environ.get("SCRIPT_NAME", "").rstrip("/") + "/"
                             + (environ.get("PATH_INFO", "") or "").lstrip("/"))
                path = "/" + path.lstrip("/")
                target = path + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in rest) if rest else "")
                return Response(303, [b""], headers=[
                    ("Location", target),
                    ("Set-Cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/")])
            return None
        return self.html(401, page("Token required", tag("p", None, "Open the address the command printed "
                                                         "(it carries ?token=...), or send Authorization: "
                                                         "Bearer <token>.")))

    @staticmethod
    def _token_of(environ: Dict[str, Any]) -> Optional[str]:
        authorization = str(environ.get("HTTP_AUTHORIZATION") or "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        for key, value in parse_qsl(environ.get("QUERY_STRING", "") or ""):
            if key == "token":
                return str(value)
        for part in str(environ.get("HTTP_COOKIE") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def write_refusal(self, environ: Dict[str, Any], csrf: Optional[str]) -> Optional[Response]:
        """403 unless writes are allowed and the request carries this process's CSRF token."""
        if not self.allow_writes:
            return self.html(403, page("Read-only", tag("p", None, "This inspector was started without "
                                                        "--allow-writes: it changes nothing.")))
        if not csrf or not hmac.compare_digest(csrf.encode(), self.csrf.encode()):
            return self.html(403, page("Forbidden", tag("p", None, "Missing or wrong CSRF token: reload "
                                                        "the page and try again.")))
        return None

    def _release(self) -> None:
        release_connection(self.storage)

    @staticmethod
    def _send(response: Response, start_response: Callable[..., Any]) -> Iterable[bytes]:
        headers = [*response.headers, *SECURITY_HEADERS]
        start_response(f"{response.status} {http.HTTPStatus(response.status).phrase}", headers)
        return response.body
