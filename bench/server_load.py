"""W14: Better Agent's HTTP routes (`better_agent_peewee.server.wsgi_app`) under load, in one process.

    python -m bench.server_load [--quick] [--dialect D | --database-url URL] [--json out.json]
        [--lock /tmp/bench.lock]

One server process (werkzeug's threaded WSGI server, a thread per connection, on 127.0.0.1)
serves `runs` concurrent runs, each answered as SSE to the client that started it
(``POST /ticker/run``), and `followers` more SSE clients following those runs
(``GET /runs/<id>/stream``, spread evenly): 100 runs and 1,000 SSE clients in the full run. Every
run's agent, written in Python, waits until all clients are connected, then emits `ticks` events
`interval` seconds apart, each carrying the wall-clock time it was emitted (``sentAt``).

Measured, for the server process: CPU seconds per wall second over the ticking window (% of one
core; the machine's cores are in the JSON), its threads and the TCP connections it holds at the
peak, and per delivered event the delivery latency (receipt by the client - ``sentAt``), p50/p99.
Every client must get every event of its run, in order (a lost or reordered event fails the run).

The baseline, side by side, is the same server and the same clients with the events kept in
memory (one list and condition per run, no database): the floor of what a thread-per-connection
WSGI server costs. The ratio says what the database-backed streams add on top of that floor.

The clients are raw sockets on one selector in this process (HTTP/1.0 requests), so the load
generator costs little; its own CPU is reported too. Every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from .followers import held_connections as held_connections_to
from .followers import server_cpu

#: connect_seconds: the time given to connect every client; the runs start ticking after it.
FULL = {"runs": 100, "followers": 900, "ticks": 40, "interval": 0.25, "connect_seconds": 20.0}
QUICK = {"runs": 4, "followers": 12, "ticks": 5, "interval": 0.05, "connect_seconds": 3.0}
#: The server process's database pool beyond one connection per run: a running run's thread holds
#: its connection from start to end, so a smaller pool keeps new runs from starting until others end.
POOL_HEADROOM = 16
#: A throwaway server's connection limit (PostgreSQL's tests default is 100: too few for 100 runs).
SERVER_SETTINGS = {"max_connections": "300"}
#: Bound on the whole ticking window beyond its planned length.
SLACK_SECONDS = 120.0
_TICK = os.sysconf("SC_CLK_TCK")


# -- the server process ------------------------------------------------------------------------------

def ticker(run: Any, request: Any) -> Dict[str, Any]:
    """The agent: waits for ``context.startAt`` (bounded), then emits ``context.ticks`` events."""
    context = request.context if isinstance(request.context, dict) else {}
    start_at = float(context.get("startAt", 0))
    ticks = min(int(context.get("ticks", 1)), 10_000)
    interval = min(float(context.get("interval", 0.1)), 10.0)
    time.sleep(min(max(0.0, start_at - time.time()), 300.0))
    run.emit({"type": "TEXT_MESSAGE_START", "messageId": f"m-{run.run_id}", "role": "assistant"})
    for i in range(ticks):
        run.check_abort()
        run.emit({"type": "TEXT_MESSAGE_CONTENT", "messageId": f"m-{run.run_id}", "delta": f"t{i} ",
                  "tick": i, "sentAt": time.time()})
        time.sleep(max(0.0, start_at + (i + 1) * interval - time.time()))
    run.emit({"type": "TEXT_MESSAGE_END", "messageId": f"m-{run.run_id}"})
    return {"finishReason": "stop", "usage": {"outputTokens": ticks}, "stepCount": 1}


class MemoryApp:
    """The baseline: the same two routes with each run's events in memory (no database)."""

    def __init__(self) -> None:
        self.runs: Dict[str, Tuple[List[bytes], threading.Condition]] = {}
        self.lock = threading.Lock()
        self.count = 0

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache, no-transform")]
        if environ["REQUEST_METHOD"] == "POST" and path == "/ticker/run":
            body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)) or b"{}")
            with self.lock:
                self.count += 1
                run_id = f"run-{self.count}"
                self.runs[run_id] = ([], threading.Condition())
            start_response("200 OK", headers + [("X-Run-Id", run_id)])
            return self._produce(run_id, body.get("context") or {})
        if environ["REQUEST_METHOD"] == "GET" and path.startswith("/runs/") and path.endswith("/stream"):
            run_id = path.split("/")[2]
            if run_id not in self.runs:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"no such run\n"]
            start_response("200 OK", headers + [("X-Run-Id", run_id)])
            return self._follow(run_id)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not here\n"]

    def _publish(self, run_id: str, event: Optional[Dict[str, Any]]) -> bytes:
        frames, cond = self.runs[run_id]
        frame = b"" if event is None else f"data: {json.dumps(event)}\n\n".encode()
        with cond:
            frames.append(frame)  # b"": the end
            cond.notify_all()
        return frame

    def _produce(self, run_id: str, context: Dict[str, Any]) -> Iterator[bytes]:
        yield b""
        start_at, ticks = float(context["startAt"]), int(context["ticks"])
        interval = float(context["interval"])
        time.sleep(min(max(0.0, start_at - time.time()), 300.0))
        for i in range(min(ticks, 10_000)):
            yield self._publish(run_id, {"type": "TEXT_MESSAGE_CONTENT", "delta": f"t{i} ", "tick": i,
                                         "sentAt": time.time()})
            time.sleep(max(0.0, start_at + (i + 1) * interval - time.time()))
        self._publish(run_id, None)

    def _follow(self, run_id: str) -> Iterator[bytes]:
        frames, cond = self.runs[run_id]
        yield b""
        sent = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with cond:
                while sent >= len(frames):
                    cond.wait(15)
                new = frames[sent:]
            sent += len(new)
            for frame in new:
                if frame == b"":
                    return
                yield frame


def serve(side: str, database_url: str, pool_size: int) -> None:
    """The server process: prints ``listening <port> <pid>``, serves until killed."""
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request would cost CPU
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # measure() asks for the stacks on a stall
    if side == "ours":
        from better_agent_peewee import create_tables, open_database, peewee_storage
        from better_agent_peewee.server import wsgi_app

        database = open_database(database_url, pooled=True, max_connections=pool_size)
        create_tables(database)
        app: Any = wsgi_app(peewee_storage(database), agents={"ticker": ticker})
    else:
        app = MemoryApp()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    server.socket.listen(2048)  # the listen backlog, for the burst of connections
    print(f"listening {server.server_port} {os.getpid()}", flush=True)
    server.serve_forever()


# -- the clients -------------------------------------------------------------------------------------

class SseClient:
    """One SSE request on a non-blocking raw socket; decodes chunked bodies and frames as they come."""

    def __init__(self, port: int, method: str, path: str, body: Optional[bytes] = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                "Content-Type: application/json\r\n")
        head += f"Content-Length: {len(body or b'')}\r\n\r\n"
        self.sock.sendall(head.encode() + (body or b""))
        self.sock.setblocking(False)
        self.raw = bytearray()
        self.head: Optional[bytes] = None
        self.chunked = False
        self.body = bytearray()
        self.done = False
        self.ticks: List[int] = []
        self.latencies: List[float] = []
        self.errors: List[str] = []

    def header(self, name: str) -> Optional[str]:
        for line in (self.head or b"").decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    def feed(self, data: bytes, now: float) -> None:
        self.raw += data
        if self.head is None:
            head, sep, rest = bytes(self.raw).partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self.raw = head, bytearray(rest)
            self.chunked = b"transfer-encoding: chunked" in head.lower()
            if b" 200 " not in head.split(b"\r\n")[0]:
                self.errors.append(head.split(b"\r\n")[0].decode("latin-1"))
        self._dechunk()
        self._frames(now)

    def _dechunk(self) -> None:
        if not self.chunked:
            self.body += self.raw
            self.raw.clear()
            return
        while True:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.raw[:line_end]).split(b";")[0] or b"0", 16)
            if size == 0:
                self.raw.clear()
                return
            if len(self.raw) < line_end + 2 + size + 2:
                return
            self.body += self.raw[line_end + 2:line_end + 2 + size]
            del self.raw[:line_end + 2 + size + 2]

    def _frames(self, now: float) -> None:
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                return
            frame = bytes(self.body[:end]).decode()
            del self.body[:end + 2]
            for line in frame.split("\n"):
                if line.startswith("event: error"):
                    self.errors.append(frame[:300])
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "sentAt" in event:
                        self.ticks.append(int(event["tick"]))
                        self.latencies.append(now - float(event["sentAt"]))


def pump(clients: List[SseClient], until: Callable[[SseClient], bool], seconds: float,
         on_idle: Optional[Callable[[], None]] = None) -> List[SseClient]:
    """Reads every client until `until(client)` or its end; returns those still waiting at the bound."""
    selector = selectors.DefaultSelector()
    waiting = {c.sock.fileno(): c for c in clients if not c.done and not until(c)}
    for c in waiting.values():
        selector.register(c.sock, selectors.EVENT_READ, c)
    deadline = time.monotonic() + seconds
    try:
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                c = key.data
                try:
                    chunk = c.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    c.errors.append(repr(exc))
                    chunk = b""
                if chunk:
                    c.feed(chunk, time.time())
                else:
                    c.done = True
                if c.done or until(c):
                    selector.unregister(c.sock)
                    waiting.pop(key.fd, None)
            if on_idle is not None:
                on_idle()
    finally:
        selector.close()
    return list(waiting.values())


# -- measuring -------------------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def held_connections(port: int) -> int:
    """Established TCP connections whose local port is the server's (its accepted sockets)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                parts = line.split()
                if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@contextlib.contextmanager
def server_process(side: str, database_url: str, pool_size: int) -> Iterator[Tuple[int, int]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "bench.server_load", "--serve", side,
                             "--database-url", database_url, "--pool-size", str(pool_size)],
                            cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "listening":
            raise RuntimeError(f"the {side} server did not start")
        yield int(line[1]), int(line[2])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def measure(side: str, params: Dict[str, Any], database_url: str,
            db_connections: Optional[Callable[[], int]] = None) -> Dict[str, Any]:
    """One side's run: connect everyone, tick, collect; the numbers of the server process."""
    runs, followers = params["runs"], params["followers"]
    ticks, interval = params["ticks"], params["interval"]
    with server_process(side, database_url, params["pool_size"]) as (port, pid):
        # The runs start ticking connect_seconds from now: every client must be connected by then.
        # Run k ticks k/runs of an interval after run 0: runs in lockstep would make every thread
        # runnable at the same instant, which measures a thundering herd rather than delivery.
        start_at = time.time() + params["connect_seconds"]
        starters = [SseClient(port, "POST", "/ticker/run", json.dumps({
            "messages": [{"role": "user", "content": "tick"}],
            "context": {"startAt": start_at + k * interval / runs, "ticks": ticks, "interval": interval},
        }).encode()) for k in range(runs)]
        left = pump(starters, lambda c: c.head is not None, params["connect_seconds"])
        if left:
            os.kill(pid, signal.SIGUSR1)  # the server's thread stacks, on its stderr
            time.sleep(1)
        assert not left, f"{len(left)} runs did not answer"
        run_ids = [c.header("x-run-id") for c in starters]
        assert all(run_ids), [c.head for c in starters if not c.header("x-run-id")][:3]
        followers_of: List[SseClient] = []
        for i in range(followers):
            followers_of.append(SseClient(port, "GET", f"/runs/{run_ids[i % runs]}/stream"))
            if i % 100 == 99:  # answered 100 at a time, as a burst of 1,000 at once would overflow nothing
                pump(followers_of[-100:], lambda c: c.head is not None, params["connect_seconds"])
        left = pump(followers_of, lambda c: c.head is not None, params["connect_seconds"])
        assert not left, f"{len(left)} followers did not answer"
        clients = starters + followers_of
        connected_by = time.time()
        assert connected_by < start_at, (
            f"connecting took {connected_by - (start_at - params['connect_seconds']):.1f} s, "
            f"more than connect_seconds={params['connect_seconds']}")
        peak = {"connections": held_connections(port), "threads": proc_threads(pid), "db": 0}
        time.sleep(max(0.0, start_at - time.time()))
        cpu0, mine0, wall0 = proc_cpu(pid), own_cpu(), time.monotonic()

        def sample() -> None:
            peak["connections"] = max(peak["connections"], held_connections(port))
            peak["threads"] = max(peak["threads"], proc_threads(pid))
            if db_connections is not None and side == "ours":
                peak["db"] = max(peak["db"], db_connections())

        left = pump(clients, lambda c: False, ticks * interval + SLACK_SECONDS,
                    on_idle=throttled(sample, 1.0))
        wall, cpu, mine = time.monotonic() - wall0, proc_cpu(pid) - cpu0, own_cpu() - mine0
    latencies = [x for c in clients for x in c.latencies]
    complete = [c for c in clients if c.ticks == list(range(ticks)) and not c.errors]
    return {
        "side": side, "clients": len(clients), "runs": runs, "complete_clients": len(complete),
        "still_open_at_bound": len(left), "errors": [e for c in clients for e in c.errors][:5],
        "delivered": len(latencies), "expected": len(clients) * ticks,
        "p50_ms": ms(percentile(latencies, 0.50)), "p99_ms": ms(percentile(latencies, 0.99)),
        "max_ms": ms(max(latencies) if latencies else None),
        "mean_ms": ms(statistics.fmean(latencies) if latencies else None),
        "server_cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
        "server_cpu_pct_of_core": round(100 * cpu / wall, 1) if wall else None,
        "client_cpu_s": round(mine, 2), "peak_connections": peak["connections"],
        "peak_threads": peak["threads"],
        "peak_database_connections": peak["db"] if db_connections is not None and side == "ours" else None,
    }


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def throttled(fn: Callable[[], None], every: float) -> Callable[[], None]:
    last = [0.0]

    def call() -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            fn()
    return call


def ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 2)


METRICS = [("delivery p50 (ms)", "p50_ms"), ("delivery p99 (ms)", "p99_ms"), ("delivery max (ms)", "max_ms"),
           ("server CPU (% of a core)", "server_cpu_pct_of_core"), ("server CPU (s)", "server_cpu_s"),
           ("HTTP connections held (peak)", "peak_connections"),
           ("database connections held (peak)", "peak_database_connections"),
           ("server threads (peak)", "peak_threads"),
           ("events delivered", "delivered"), ("clients with every event in order", "complete_clients"),
           ("load generator CPU (s)", "client_cpu_s"),
           ("database server CPU (s, during the wsgi_app side)", "database_server_cpu_s")]


def table(ours: Dict[str, Any], base: Dict[str, Any]) -> str:
    lines = ["| W14 metric | wsgi_app | in-memory baseline | ratio |", "|---|---|---|---|"]
    for title, key in METRICS:
        a, b = ours.get(key), base.get(key)
        ratio = f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
        lines.append(f"| {title} | {a} | {b} | {ratio} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few clients and ticks (the smoke run)")
    parser.add_argument("--dialect", choices=["sqlite", "postgres", "mysql"], default="sqlite",
                        help="a temporary SQLite file or a throwaway server (bench/env.py; default sqlite)")
    parser.add_argument("--database-url", help="an existing database instead (its tables are created)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--lock", help="hold this file's lock (flock) while measuring")
    parser.add_argument("--serve", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--pool-size", type=int,
                        help=f"the server's database pool (default: one per run + {POOL_HEADROOM})")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(FULL[key]), help=f"default {FULL[key]}")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.database_url, args.pool_size or 64)
        return 0
    params = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    params["pool_size"] = args.pool_size or params["runs"] + POOL_HEADROOM
    if params["runs"] < 1 or params["followers"] < 0 or params["ticks"] < 1:
        parser.error("--runs and --ticks must be at least 1, --followers at least 0")
    with contextlib.ExitStack() as stack:
        if args.lock:
            import fcntl
            handle = stack.enter_context(open(args.lock, "w"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        url, server, db_connections = args.database_url, None, None
        if url is None:
            from .env import open_target

            log = lambda text: print(text, file=sys.stderr)  # noqa: E731
            target = stack.enter_context(open_target(args.dialect, log=log, settings=SERVER_SETTINGS))
            url, server = target.url, target.server
            if args.dialect != "sqlite":  # (a SQLite file has no server to ask)
                db_connections = lambda: held_connections_to(target)  # noqa: E731
        load = os.getloadavg()
        db_cpu0 = server_cpu(server)
        ours = measure("ours", params, url, db_connections)
        db_cpu1 = server_cpu(server)
        base = measure("baseline", params, url)
        if db_cpu0 is not None and db_cpu1 is not None:
            ours["database_server_cpu_s"] = round(db_cpu1 - db_cpu0, 2)
    print(table(ours, base))
    print(f"\nparams {params}; cores {os.cpu_count()}; load average before {load[0]:.2f} {load[1]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "params": params, "cores": os.cpu_count(), "loadavg": load,
                       "ours": ours, "baseline": base}, f, indent=1)
    whole = all(side["complete_clients"] == side["clients"] for side in (ours, base))
    return 0 if whole else 1


if __name__ == "__main__":
    sys.exit(main())
