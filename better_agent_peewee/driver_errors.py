"""Classifying driver errors: which server refusals and failures mean what.

The `Dialect` classes ask these when a statement fails (never on the happy path): is the
connection gone, could the server not be reached, was it a deadlock. Each driver reports
differently: PostgreSQL by SQLSTATE (psycopg2 ``pgcode``, psycopg 3 ``sqlstate``) or, for
failures to connect, by message text; MySQL/MariaDB by error number.
"""
from __future__ import annotations

import re
import select
from typing import Optional

__all__ = ["driver_error", "pg_code", "mysql_errno", "pg_gone_code", "socket_readable", "PG_UNREACHABLE",
           "MYSQL_GONE", "MYSQL_UNREACHABLE", "first_line"]


def driver_error(exc: BaseException) -> BaseException:
    """The driver's exception behind a peewee one (peewee keeps it as ``orig``)."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        # (Before the context: an error raised again while another was handled -- the executor
        # running a statement again after a reconnect -- has that other one as its context.)
        return orig
    first = exc.args[0] if exc.args else None
    if isinstance(first, BaseException):
        return first
    return exc.__cause__ or exc.__context__ or exc


def first_line(exc: BaseException) -> str:
    """The first non-blank line of `exc`'s message, or its class name: for one-line log messages
    (a driver's message can be several lines, or only white space)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def pg_code(exc: BaseException) -> Optional[str]:
    """The PostgreSQL SQLSTATE of a failure (e.g. ``"40P01"``), or None when the driver gave none."""
    err = driver_error(exc)
    return getattr(err, "pgcode", None) or getattr(err, "sqlstate", None)


def mysql_errno(exc: BaseException) -> Optional[int]:
    """The MySQL/MariaDB error number of a failure (e.g. ``2006``), or None when it has none."""
    args = getattr(driver_error(exc), "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def socket_readable(fd: int) -> bool:
    """True when the socket `fd` has something to read now (checked without waiting)."""
    # An idle client connection has nothing to read unless the server said something on its
    # own: a termination notice / end-of-file (or, rarely, a NOTIFY; a false alarm costs a probe).
    return bool(select.select([fd], [], [], 0)[0])


def pg_gone_code(code: Optional[str]) -> bool:
    """True when SQLSTATE `code` means the connection is gone (lost, or the server shutting down)."""
    # Class 08 (connection exception); 57P01-57P03: admin shutdown, crash shutdown, cannot connect now.
    return code is not None and (code.startswith("08") or code in ("57P01", "57P02", "57P03"))


PG_UNREACHABLE = re.compile(
    r"connection refused|could not connect|server closed the connection|terminating connection|"
    r"the database system is (?:starting up|shutting down|not yet accepting|in recovery)|"
    r"could not (?:send|receive) data|timeout expired|no connection to the server|"
    r"could not translate host name|no route to host|network is unreachable|"
    r"SSL (?:connection has been closed|SYSCALL error)|"
    # pgbouncer while its server is down or restarting (server_login_retry)
    r"server login has been failing|pgbouncer cannot connect to server|server conn crashed|"
    r"no more connections allowed", re.IGNORECASE)

#: MySQL/MariaDB client and server errors meaning the connection is gone: server has gone
#: away, lost connection during query / at handshake, server shutdown in progress, connection
#: killed (MariaDB), disconnected for inactivity (MySQL 8).
MYSQL_GONE = frozenset((2006, 2013, 2055, 1053, 1927, 4031))
#: ... and that the server cannot be reached: can't connect (socket / TCP), plus the above.
MYSQL_UNREACHABLE = MYSQL_GONE | {2002, 2003}
