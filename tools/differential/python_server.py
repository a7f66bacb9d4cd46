"""Our side of the differential run: `better_agent_peewee.server.wsgi_app` on a SQLite file, with
Python agents that emit what reference_server.mjs's scripted model makes Better Agent emit.

    PYTHONPATH=. python tools/differential/python_server.py --port=0 --script='{...}' --database=x.sqlite

Serves two apps on one threaded werkzeug server on 127.0.0.1, as the reference does: `/api`
(`abort_on_disconnect=False`) and `/strict` (the default), auth from `authorization: Bearer
<subject>`. Prints `listening <url>` once ready (run.py reads it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from werkzeug.serving import make_server

from better_agent_peewee import create_tables, open_database, peewee_storage
from better_agent_peewee.server import wsgi_app

BEARER = re.compile(r"^Bearer ([A-Za-z0-9_-]+)$")


def auth(environ: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """`authorization: Bearer <subject>` gives {subject}; anything else, no auth context."""
    match = BEARER.match(environ.get("HTTP_AUTHORIZATION", ""))
    return {"subject": match.group(1)} if match else None


def scripted_agent(reply: Mapping[str, Any]) -> Callable[[Any, Any], Dict[str, Any]]:
    """One step of the reference's scripted model: START, a CONTENT per chunk, END; on abort the
    chunks stop and `check_abort` raises with the runtime's message for that point (the server
    ends the run with RUN_ERROR ABORTED, "Run aborted after model generation.")."""
    chunks: List[str] = list(reply["chunks"])
    delay = float(reply.get("delayMs", 0)) / 1000
    usage = {"inputTokens": 3, "outputTokens": len(chunks), "totalTokens": 3 + len(chunks)}

    def agent(run: Any, request: Any) -> Dict[str, Any]:
        message_id = f"message_{uuid.uuid4()}"
        now = lambda: int(time.time() * 1000)  # noqa: E731
        run.emit({"type": "STEP_STARTED", "timestamp": now(), "stepName": "model:1"})
        run.emit({"type": "TEXT_MESSAGE_START", "timestamp": now(), "messageId": message_id,
                  "role": "assistant"})
        for chunk in chunks:
            if delay:
                time.sleep(delay)
            run.check_abort("Run aborted after model generation.")  # the runtime's words for this point
            run.emit({"type": "TEXT_MESSAGE_CONTENT", "timestamp": now(), "messageId": message_id,
                      "delta": chunk})
        run.emit({"type": "TEXT_MESSAGE_END", "timestamp": now(), "messageId": message_id})
        run.append_messages([{"id": message_id, "role": "assistant", "content": "".join(chunks)}])
        run.emit({"type": "STEP_FINISHED", "timestamp": now(), "stepName": "model:1"})
        return {"finishReason": "stop", "usage": usage, "stepCount": 1}

    return agent


class Mount:
    """Two WSGI apps under two path prefixes (a tiny DispatcherMiddleware, stdlib only)."""

    def __init__(self, apps: Dict[str, Any]) -> None:
        self.apps = apps

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        for prefix, app in self.apps.items():
            if path == prefix or path.startswith(prefix + "/"):
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
                environ["PATH_INFO"] = path[len(prefix):]
                result: Iterable[bytes] = app(environ, start_response)
                return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no app here\n"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", required=True)
    parser.add_argument("--database", required=True, help="a SQLite file (created)")
    args = parser.parse_args()
    script = json.loads(args.script)
    agents = {name: scripted_agent(reply) for name, reply in script["agents"].items()}
    apps = {}
    for prefix, abort_on_disconnect in (("/api", False), ("/strict", True)):
        database = open_database(f"sqlite:///{args.database}{prefix.replace('/', '.')}", pooled=True)
        create_tables(database)
        storage = peewee_storage(database)
        apps[prefix] = wsgi_app(storage, agents=agents, auth=auth,
                                abort_on_disconnect=abort_on_disconnect)
    server = make_server("127.0.0.1", args.port, Mount(apps), threaded=True)
    print(f"listening http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
