"""The ``better-agent-peewee`` command line: init, check, prune, stats, tail, export, inspect.

Each command is a thin shell over one library call a Python program can make too
(`create_tables`, `check_schema`, `prune_runs` / `reap_stale`, `stats`,
`storage.streams.resume`, `storage.memory`). The database comes from ``--database URL``
or the ``DATABASE_URL`` environment variable, in ``playhouse.db_url`` form::

    sqlite:///agent.db   sqlite:////var/lib/app/agent.db
    postgresql://user:password@host:5432/dbname
    mysql://user:password@host:3306/dbname

Exit codes: 0 success; 1 failure (unreachable server, missing tables, schema differences,
unknown run or thread, a database error); 2 usage (unknown command or option, bad
duration, bad or missing URL); 130 when ``tail`` is stopped with Ctrl-C. Expected failures
print one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, List, NoReturn, Optional, Sequence, Tuple, Union

import peewee

from . import __version__
from .database_url import POOL_WAIT_SECONDS, SQLITE_PRAGMAS, DatabaseURLError, open_database, redact
from .domains import ALL_DOMAINS, check_domains, physical_tables
from .errors import StorageError, first_line
from .followers import STALE_AFTER
from .inspector import inspector_app, make_inspector_server
from .prune import PruneReport, prune_runs
from .reap import reap_stale
from .records import FINISHED_STATUSES
from .retention import ThreadPruneReport
from .schema import check_schema, create_tables
from .stats import stats
from .storage import Storage, peewee_storage
from .timestamps import ms_to_iso, parse_duration

# open_database and its companions moved to database_url; still importable from here.
__all__ = ["main", "open_database", "parse_duration", "DatabaseURLError", "redact", "SQLITE_PRAGMAS",
           "POOL_WAIT_SECONDS"]

PROG = "better-agent-peewee"


class _Failure(Exception):
    """An expected failure: one line on stderr and an exit code, no traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- reusable pieces ------------------------------------------------------------------------

# -- command implementations ---------------------------------------------------------------

def _connect(args: argparse.Namespace, create: bool = False) -> peewee.Database:
    url = args.database or os.environ.get("DATABASE_URL")
    if not url:
        raise _Failure("no database: pass --database URL or set DATABASE_URL", 2)
    try:
        db = open_database(url)
    except DatabaseURLError as exc:
        raise _Failure(str(exc), 2) from None
    if isinstance(db, peewee.SqliteDatabase) and not create:
        path = db.database
        # Connecting would create an empty file and then report missing tables; say what it is.
        if path != ":memory:" and not path.startswith("file:") and not os.path.exists(path):
            raise _Failure(f"no SQLite database at {path!r} (run `{PROG} init` to create one)")
    try:
        db.connect(reuse_if_open=True)
    except peewee.DatabaseError as exc:  # OperationalError, InterfaceError, ...
        raise _Failure(f"cannot connect to {redact(url)}: {first_line(exc)}") from None
    except TypeError as exc:  # a query-string option the driver does not know
        raise _Failure(f"bad database URL {redact(url)!r}: {first_line(exc)}", 2) from None
    return db


def _require_tables(db: peewee.Database, needed: Iterable[str]) -> None:
    present = set(db.get_tables())
    missing = [t for t in needed if t not in present]
    if missing:
        raise _Failure(f"missing table{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                       f"in {redact(db_description(db))} (run `{PROG} init` first)")


def db_description(db: peewee.Database) -> str:
    """A short name for `db` in messages: its file or database name."""
    return str(db.database)


def _storage(db: peewee.Database) -> Storage:
    return peewee_storage(db)


def cmd_init(args: argparse.Namespace) -> int:
    db = _connect(args, create=True)
    before = set(db.get_tables())
    added = create_tables(db, concurrently=args.concurrently, domains=args.domains)
    tables = physical_tables(args.domains)
    created = [t for t in tables if t not in before]
    if created:
        print(f"created {', '.join(created)}" + (f"; {len(tables) - len(created)} already present"
                                                  if len(created) < len(tables) else ""))
    else:
        print("all tables already present")
    if added:
        print(f"added index{'es' if len(added) > 1 else ''} {', '.join(added)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    db = _connect(args)
    report = check_schema(db, domains=args.domains)
    for problem in report:
        print(problem)
    for advice in report.advice:
        print(f"advice: {advice}")
    if not report:
        # Advice alone: everything works (only slower), so this is not a failure.
        print("schema ok" + (f" ({len(report.advice)} advice, above)" if report.advice else ""))
        return 0
    raise _Failure(f"schema does not match ({len(report)} difference{'s' if len(report) > 1 else ''}, "
                   f"listed on stdout)")


def cmd_prune(args: argparse.Namespace) -> int:
    if args.older_than is None and args.reap_stale is None and args.threads_idle_for is None:
        raise _Failure("nothing to do: pass --older-than DURATION (prune runs), --reap-stale DURATION "
                       "(reap), --threads-idle-for DURATION (prune threads), or several", 2)
    if args.agent is not None and args.threads_idle_for is None:
        raise _Failure("--agent chooses the threads --threads-idle-for prunes: pass both", 2)
    if args.threads_idle_for is not None and args.threads_idle_for <= _dt.timedelta(0):
        raise _Failure(f"--threads-idle-for must be a positive duration, got {args.threads_idle_for}", 2)
    db = _connect(args)
    if args.older_than is not None or args.reap_stale is not None:
        _require_tables(db, physical_tables(["runs"]))  # streams: pruned when there, skipped when not
    if args.threads_idle_for is not None:
        _require_tables(db, physical_tables(["memory"]))
    if "interrupted" in (args.statuses or ()) and not args.include_interrupted:
        raise _Failure("interrupted runs wait for a human to resume them: add --include-interrupted "
                       "to prune them", 2)
    # The domains whose tables are there: prune skips the others (streams kept elsewhere, say).
    present = set(db.get_tables())
    storage = peewee_storage(db, domains=[d for d in ALL_DOMAINS if present.issuperset(physical_tables([d]))])
    parts: List[str] = []
    if args.reap_stale is not None:
        # A dry run counts the runs it would reap and writes nothing, like the prune after it.
        reaped = reap_stale(storage, args.reap_stale, dry_run=args.dry_run)
        parts.append(f"{'would reap' if args.dry_run else 'reaped'} {reaped} stale "
                     f"run{'' if reaped == 1 else 's'}")
    if args.older_than is not None:
        report = prune_runs(storage, args.older_than,
                            statuses=args.statuses or ("completed", "failed", "aborted"),
                            batch_size=args.batch_size, dry_run=args.dry_run,
                            include_interrupted=args.include_interrupted,
                            progress=_progress(lambda r: f"{r.runs} runs, {r.streams} streams, "
                                                         f"{r.events} events"))
        parts.append(_done(report))
    if args.threads_idle_for is not None:
        threads = storage.memory.prune_threads(
            args.threads_idle_for, agent_name=args.agent, batch_size=args.batch_size, dry_run=args.dry_run,
            progress=_progress(lambda r: f"{r.threads} threads, {r.messages} messages"))
        parts.append(_done(threads))
    print("; ".join(parts) + (" [dry run]" if args.dry_run else ""))
    return 0


def _progress(totals: Callable[[Any], str]) -> Optional[Callable[[Any], None]]:
    """On a terminal, the progress line a prune rewrites after every batch (None elsewhere)."""
    if not sys.stderr.isatty():
        return None

    def progress(report: Any) -> None:
        sys.stderr.write(f"\rbatch {report.batches}: {totals(report)} ({report.seconds:.1f}s)")
        sys.stderr.flush()
    return progress


def _done(report: Union[PruneReport, ThreadPruneReport]) -> str:
    """A prune's summary (ending the progress line on a terminal), without its ``[dry run]``:
    the command's line says it once, at its end."""
    if report.batches and sys.stderr.isatty():
        sys.stderr.write("\n")
    summary = report.summary()
    return summary[:-len(" [dry run]")] if summary.endswith(" [dry run]") else summary


def cmd_stats(args: argparse.Namespace) -> int:
    db = _connect(args)
    _require_tables(db, physical_tables(args.domains))
    numbers = stats(peewee_storage(db, domains=args.domains))
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0
    width = max(len(t) for t in numbers["tables"])
    for table, count in numbers["tables"].items():
        print(f"{table:<{width}}  {count:>10}")
    runs = numbers["runs"]
    print("runs by status: " + (", ".join(f"{s} {n}" for s, n in runs.items()) if runs else "none"))
    print(f"oldest run:     {_iso_or_none(numbers['oldestRun'])}")
    print(f"newest run:     {_iso_or_none(numbers['newestRun'])}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    db = _connect(args)
    _require_tables(db, ("streams", "stream_events"))
    storage = _storage(db)
    write, flush = sys.stdout.write, sys.stdout.flush
    follower = storage.streams.resume(args.run_id, args.from_seq, poll_interval=args.poll_interval)
    for event in follower:
        write(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
        flush()  # a follower (or `| jq`) sees each event as it arrives
    if follower.reason == "stale":
        raise _Failure(f"run {args.run_id!r} still says running, but its worker sent no heartbeat for "
                       f"{STALE_AFTER:g} s: presumed dead (`{PROG} prune --reap-stale` marks it failed)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    db = _connect(args)
    _require_tables(db, ("threads", "messages"))
    storage = _storage(db)
    thread = storage.memory.threads.get(args.thread_id)
    if thread is None:
        raise _Failure(f"thread {args.thread_id!r} not found")
    messages = storage.memory.messages.list(args.thread_id)
    json.dump({"thread": thread, "messages": messages}, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    checked = _connect(args)
    _require_tables(checked, physical_tables())
    checked.close()
    # Pooled: each request runs on a thread of its own and gives its connection back when it
    # ends; unpooled, every page would open a new connection (tens of ms on a server).
    db = open_database(args.database or os.environ.get("DATABASE_URL") or "", pooled=True)
    token = args.token or os.environ.get("BAP_INSPECT_TOKEN") or None
    try:
        app = inspector_app(_storage(db), allow_writes=args.allow_writes, token=token)
        server = make_inspector_server(app, args.host, args.port, token)
    except ValueError as exc:
        raise _Failure(str(exc), 2) from None
    except OSError as exc:
        raise _Failure(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    db.close()
    host = f"[{args.host}]" if ":" in args.host else args.host
    address = f"http://{host}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(f"inspecting {redact(db_description(db))} at {address} "
          f"({'writes allowed' if args.allow_writes else 'read-only'}; Ctrl-C stops)", flush=True)
    try:
        with server:
            server.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0


# -- argument parsing ----------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _duration(text: str) -> _dt.timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _domains(text: str) -> Tuple[str, ...]:
    try:
        return check_domains(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _add_prune(commands: Any, common: argparse.ArgumentParser) -> None:
    """The `prune` command's arguments (the longest list: runs, stale runs, idle threads)."""
    p = commands.add_parser("prune", parents=[common],
                            help="delete finished runs (and their streams and events) older than a duration, "
                                 "mark runs whose worker died failed (--reap-stale), and/or delete idle "
                                 "threads with their messages (--threads-idle-for)")
    p.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="keep runs that finished more recently than this (30s, 15m, 12h, 7d); "
                        "without it, only --reap-stale runs")
    p.add_argument("--statuses", nargs="+", metavar="STATUS", choices=FINISHED_STATUSES,
                   help="finished statuses to prune (default: completed failed aborted)")
    p.add_argument("--include-interrupted", action="store_true",
                   help="prune interrupted runs too (by default they wait for a human)")
    p.add_argument("--batch-size", type=_positive_int, default=1000, metavar="N",
                   help="runs (or threads) per transaction (default 1000)")
    p.add_argument("--dry-run", action="store_true",
                   help="count what would be reaped and deleted, write nothing")
    p.add_argument("--threads-idle-for", type=_duration, metavar="DURATION",
                   help="delete threads (and their messages) not updated for this long (90d); never a "
                        "thread with a running run. Alone, or with --older-than and --reap-stale")
    p.add_argument("--agent", metavar="NAME", help="only this agent's threads (with --threads-idle-for)")
    p.add_argument("--reap-stale", type=_duration, metavar="DURATION",
                   help="first mark runs still running but not updated for this long as failed "
                        "(alone, without --older-than: a reap-only job for a frequent cron line)")
    p.set_defaults(func=cmd_prune)


def _add_following_and_export(commands: Any, common: argparse.ArgumentParser) -> None:
    """The commands that read one run or thread: `tail`, `export`, `inspect`."""
    p = commands.add_parser("tail", parents=[common],
                            help="follow a run's stream like tail -f: one JSON event per line")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--from-seq", type=_non_negative_int, default=0, metavar="N",
                   help="start after event N (default 0: from the beginning)")
    p.add_argument("--poll-interval", type=_seconds, default=0.25, metavar="SECONDS",
                   help="seconds between polls while the stream is idle (default 0.25)")
    p.set_defaults(func=cmd_tail)

    p = commands.add_parser("export", parents=[common], help="print a thread and its messages as JSON")
    p.add_argument("thread_id", metavar="THREAD_ID")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("inspect", parents=[common],
                            help="serve a web inspector of threads, runs and live streams (read-only unless "
                                 "--allow-writes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                   "needs --token)")
    p.add_argument("--port", type=_non_negative_int, default=8765,
                   help="port (default 8765; 0: any free one)")
    p.add_argument("--allow-writes", action="store_true",
                   help="offer abort, reap-stale and prune (each behind a CSRF token); "
                        "off: every write is 403")
    p.add_argument("--token", metavar="T", help="require this token on every request (default: "
                   "$BAP_INSPECT_TOKEN); needed for a --host other than loopback")
    p.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tools and tests)."""
    parser = _Parser(prog=PROG, description="Operate a Better Agent database: create and check the "
                     "schema, prune finished runs, show stats, follow a stream, export a thread.",
                     epilog="Exit codes: 0 ok, 1 failure, 2 usage, 130 tail stopped by Ctrl-C.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--database", "-d", metavar="URL",
                        help="database URL (default: $DATABASE_URL), e.g. sqlite:///agent.db, "
                             "postgresql://user:pw@host/db, mysql://user:pw@host/db")
    common.add_argument("--verbose", "-v", action="store_true", help="log what the library does on stderr")
    domains = _Parser(add_help=False)
    domains.add_argument("--domains", type=_domains, metavar="LIST",
                         help="only the tables of these storage domains, comma-separated: memory "
                              "(threads, messages), runs, streams (streams, stream events); default all")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser("init", parents=[common, domains],
                            help="create the five tables and add missing indexes (safe to repeat)")
    p.add_argument("--concurrently", action="store_true",
                   help="PostgreSQL: build missing indexes with CREATE INDEX CONCURRENTLY, so the "
                        "tables keep taking writes meanwhile")
    p.set_defaults(func=cmd_init)

    p = commands.add_parser("check", parents=[common, domains],
                            help="compare the schema with what the adapter needs; exit 1 on problems "
                                 "(advice, such as a missing performance index, exits 0)")
    p.set_defaults(func=cmd_check)

    _add_prune(commands, common)

    p = commands.add_parser("stats", parents=[common, domains],
                            help="rows per table, runs per status, oldest and newest run")
    p.add_argument("--json", action="store_true", help="print JSON (timestamps as epoch ms)")
    p.set_defaults(func=cmd_stats)

    _add_following_and_export(commands, common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except _Failure as exc:
        _fail(args, str(exc))
        return exc.code
    except KeyboardInterrupt:
        # Ctrl-C is how one stops `tail`: no traceback, the shell's code for SIGINT.
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        # The reader went away (`tail RUN | head`); silence the interpreter's final flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except StorageError as exc:
        _fail(args, first_line(exc))
        return 1
    except peewee.DatabaseError as exc:
        _fail(args, f"database error: {first_line(exc)}")
        return 1


def _fail(args: argparse.Namespace, message: str) -> None:
    sys.stderr.write(f"{PROG} {args.command}: error: {message}\n")


def _iso_or_none(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return ms_to_iso(ms)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
