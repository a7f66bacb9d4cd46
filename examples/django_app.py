"""Better Agent's routes inside a Django project: one URL include serves every route its client calls.

    pip install django
    python examples/django_app.py runserver                 # http://127.0.0.1:8000/api/agents/...
    DATABASE_URL=postgresql://app:secret@localhost/app python examples/django_app.py runserver

`better_agent_peewee.wsgi_app` is a WSGI application; `agent_routes(app)` turns it into a
Django view, so it sits behind Django's URL resolver and middleware like any other view:

    urlpatterns = [path("api/agents/", include(agent_routes(agents_app)))]

The view hands the app the request's WSGI environ with the Django request in it
(``environ["django.request"]``), so the app's auth resolver can use Django's own login
(`django_auth` below reads ``request.user``; this single-file project has no user tables,
so it reads a demo ``Authorization: Bearer <name>`` header instead). Its responses, SSE
included, are streamed through Django's `StreamingHttpResponse`, which closes the app's body
when the client goes away (the run is then aborted, as Better Agent does).

Django keeps its own database settings; the agent storage is Peewee's, on the same or
another database.
"""
from __future__ import annotations

import io
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import django
import peewee
from django.conf import settings
from django.core.management import execute_from_command_line
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.urls import URLPattern, include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from better_agent_peewee import RunRequest, TrackedRun, create_tables, open_database, peewee_storage, wsgi_app

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "demo only: set DJANGO_SECRET_KEY"),
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"], ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"], DATABASES={},
    )
    django.setup()


def agent_routes(app: Callable[..., Iterable[bytes]]) -> List[URLPattern]:
    """URL patterns that hand every path below their prefix to the WSGI `app` (for ``include``)."""

    @csrf_exempt  # bearer-token auth: no cookie rides along, so no cross-site request can forge one
    def view(request: HttpRequest, rest: str = "") -> StreamingHttpResponse:
        environ: Dict[str, Any] = dict(request.environ)
        prefix = request.path_info[:len(request.path_info) - len(rest)].rstrip("/")
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "").rstrip("/") + prefix
        environ["PATH_INFO"] = "/" + rest
        body = request.body  # (read through Django, which applies its upload limit)
        environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))})
        environ["django.request"] = request
        answer: Dict[str, Any] = {}
        chunks = app(environ, lambda status, headers, exc_info=None: answer.update(status=status,
                                                                                 headers=headers))
        response = StreamingHttpResponse(chunks, status=int(answer["status"].split()[0]))
        del response["Content-Type"]  # (Django's default): the app's own headers only
        for name, value in answer["headers"]:
            response[name] = value
        return response

    return [re_path(r"^(?P<rest>.*)$", view)]


def django_auth(environ: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The auth context of the Django request: its logged-in user, or (this demo has no user
    tables) the name in ``Authorization: Bearer <name>``."""
    request = environ["django.request"]
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return {"subject": str(user.pk)}
    scheme, _, name = request.headers.get("Authorization", "").partition(" ")
    return {"subject": name} if scheme == "Bearer" and name else None


def echo_agent(run: TrackedRun, request: RunRequest) -> Dict[str, Any]:
    """A stand-in for a model: streams the user's last message back, word by word."""
    text = next((m.get("content") for m in reversed(request.messages) if m.get("role") == "user"), "")
    reply_id = f"{run.run_id}-reply"
    run.check_abort()  # before the message starts: an aborted run says nothing
    run.emit({"type": "TEXT_MESSAGE_START", "messageId": reply_id, "role": "assistant"})
    for word in str(text).split():
        time.sleep(float(os.environ.get("AGENT_WORD_SECONDS", "0.02")))  # the model thinking
        run.check_abort()
        run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": reply_id, "delta": word + " "})
    run.emit({"type": "TEXT_MESSAGE_END", "messageId": reply_id})
    run.append_messages([{"id": reply_id, "role": "assistant", "content": str(text)}])
    return {"finishReason": "stop", "stepCount": 1}


def hello(request: HttpRequest) -> JsonResponse:
    """A view of the project's own, next to the agent routes."""
    return JsonResponse({"hello": "django"})


def create_storage(database: Union[str, peewee.Database, None] = None) -> Any:
    """The agent storage over `database` (a URL, a Peewee database, or None for $DATABASE_URL)."""
    if database is None or isinstance(database, str):
        database = open_database(database or os.environ.get("DATABASE_URL") or "sqlite:///agent.db",
                                 pooled=True)
    create_tables(database)  # convenient for a demo; in production: `better-agent-peewee init`
    return peewee_storage(database)


def build_urls(storage: Any) -> List[Any]:
    """The project's URL patterns: its own view, and the agent routes under /api/agents/."""
    agents_app = wsgi_app(storage, agents={"echo": echo_agent}, auth=django_auth)
    return [path("", hello), path("api/agents/", include(agent_routes(agents_app)))]


urlpatterns: List[Any] = []


def create_app(database: Union[str, peewee.Database, None] = None) -> Any:
    """The project's WSGI application, with the agent routes over `database`."""
    urlpatterns[:] = build_urls(create_storage(database))
    return get_wsgi_application()


if __name__ == "__main__":
    urlpatterns[:] = build_urls(create_storage())
    execute_from_command_line(sys.argv)
