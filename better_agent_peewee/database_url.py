"""Opening a database from a URL: `open_database`, with the settings this package relies on.

URLs are in ``playhouse.db_url`` form::

    sqlite:///agent.db   sqlite:////var/lib/app/agent.db
    postgresql://user:password@host:5432/dbname
    mysql://user:password@host:3306/dbname
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import peewee
from playhouse import db_url

__all__ = ["open_database", "redact", "DatabaseURLError", "SQLITE_PRAGMAS", "POOL_WAIT_SECONDS"]

#: SQLite pragmas `open_database` sets: WAL so followers read while a writer appends,
#: foreign keys so messages need their thread, a busy timeout so writers wait, not fail.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10000}

#: Seconds a thread waits for a free pooled connection before the pool gives up (peewee's
#: own default, no wait at all, fails a request the moment a burst exceeds the pool).
POOL_WAIT_SECONDS = 30


class DatabaseURLError(ValueError):
    """A database URL that names no supported database."""


def open_database(url: str, *, pooled: bool = False, **options: Any) -> peewee.Database:
    """A Peewee database (not yet connected) for a ``playhouse.db_url`` URL.

    SQLite files are opened in WAL mode with foreign keys on and a busy timeout; MySQL uses
    ``utf8mb4`` unless the URL says otherwise. User name and password may be percent-encoded.

    :param url: e.g. ``sqlite:///agent.db``, ``postgresql://u:p@host/db``, ``mysql://u:p@host/db``.
        PostgreSQL URLs may list several hosts as libpq does
        (``postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write``); the
        query string's options (``target_session_attrs``, ``connect_timeout``, ...) go to the
        driver as they are. ``psycopg3://`` (or ``prefer_psycopg3=True``) uses psycopg 3.
    :param pooled: use the `playhouse.pool` class of the same database (as the URL scheme
        ``postgresql+pool://`` would); pool options such as ``max_connections`` and
        ``stale_timeout`` go in `options` (or the URL's query string). A pooled database
        waits up to ``timeout`` seconds (default `POOL_WAIT_SECONDS`) for a free connection,
        and a pooled SQLite database opens its connections with ``check_same_thread=False``,
        since the pool hands a connection made by one thread to another (one at a time).
    :param options: extra keyword arguments for the database class (they win over the URL's).
    :raises DatabaseURLError: when the URL names no supported database.
    """
    if not isinstance(url, str) or not url.strip():
        raise DatabaseURLError("empty database URL")
    url = url.strip()
    parts = urlsplit(url)
    if pooled and parts.scheme and not parts.scheme.lower().endswith("+pool") and \
            f"{parts.scheme.lower()}+pool" in db_url.schemes:
        url = f"{parts.scheme}+pool{url[len(parts.scheme):]}"
        parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not parts.scheme or scheme not in db_url.schemes:
        known = "sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DB, mysql://USER:PASSWORD@HOST/DB"
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise DatabaseURLError(f"unsupported database URL {redact(url)!r} ({shown}); expected {known}")
    if scheme.startswith("sqlite"):
        if parts.netloc:
            # sqlite://agent.db reads "agent.db" as a host name and opens an in-memory database.
            raise DatabaseURLError(f"bad SQLite URL {url!r}: a file takes three slashes "
                                   f"({parts.scheme}:///relative/path.db or "
                                   f"{parts.scheme}:////absolute/path.db)")
        pragmas = dict(SQLITE_PRAGMAS)
        pragmas.update(options.pop("pragmas", None) or {})
        options["pragmas"] = pragmas
    elif scheme.startswith("mysql"):
        options.setdefault("charset", "utf8mb4")
    elif scheme.startswith(("postgres", "psycopg")) and "," in parts.netloc.rpartition("@")[2]:
        url = _single_host(url, parts, options)
    if scheme.endswith("+pool"):
        in_url = parse_qs(parts.query)
        if "timeout" not in in_url:
            options.setdefault("timeout", POOL_WAIT_SECONDS)
        if scheme.startswith("sqlite") and "check_same_thread" not in in_url:
            options.setdefault("check_same_thread", False)
    try:
        database: peewee.Database = db_url.connect(url, unquote_password=True, unquote_user=True, **options)
        return database
    except (ValueError, RuntimeError, TypeError) as exc:
        raise DatabaseURLError(f"bad database URL {redact(url)!r}: {exc}") from None


def _single_host(url: str, parts: Any, options: Any) -> str:
    """`url` with libpq's multi-host list (``h1:p1,h2:p2``) moved into `options`.

    urllib cannot read such a netloc ("Port could not be cast to integer"), but libpq
    takes the same list as ``host=h1,h2 port=p1,p2``: the hosts are tried in order, and
    ``target_session_attrs`` (from the query string, passed through like every other
    libpq option there) picks the primary after a failover.
    """
    userinfo, _, hosts = parts.netloc.rpartition("@")
    names, ports = [], []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not colon:
            host, port = item, ""
        if not host or (port and not port.isdigit()):
            raise DatabaseURLError(f"bad host list {hosts!r} in database URL {redact(url)!r}: expected "
                                   "host1:port1,host2:port2")
        names.append(host.strip("[]"))
        ports.append(port or "5432")
    options.setdefault("host", ",".join(names))
    options.setdefault("port", ",".join(ports))
    netloc = f"{userinfo}@{names[0]}" if userinfo else names[0]
    return str(urlunsplit(parts._replace(netloc=netloc)))


def redact(url: str) -> str:
    """`url` with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return "<unparseable URL>"
