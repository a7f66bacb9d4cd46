"""Timestamps: epoch milliseconds (UTC) in records, each dialect's form in the database.

One clock (`now_ms`), one ISO formatter (`ms_to_iso`), one ISO parser (`parse_iso_ms`),
and the per-dialect codecs the `Dialect` classes pick from (see "Encodings" in
docs/contract.md): SQLite text ``YYYY-MM-DDTHH:MM:SS.mmmZ``, MySQL naive UTC DATETIME(3),
PostgreSQL timestamptz.
"""
from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any

__all__ = ["MAX_TIMESTAMP_MS", "now_ms", "ms_to_iso", "parse_iso_ms", "sqlite_encode_ts", "sqlite_decode_ts",
           "datetime_to_ms", "mysql_encode_ts", "postgres_encode_ts", "parse_duration"]

_MS = _dt.timedelta(milliseconds=1)
_EPOCH = _dt.datetime(1970, 1, 1)
_EPOCH_UTC = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)

#: Largest timestamp every dialect can hold: 9999-12-31T23:59:59.999Z.
MAX_TIMESTAMP_MS = 253402300799999


def now_ms() -> int:
    """Now in epoch milliseconds (UTC): what Better Agent's ``Date.now()`` writes."""
    return time.time_ns() // 1_000_000


def ms_to_iso(ms: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` for epoch ms (for messages and the command line)."""
    try:
        stamp = _EPOCH + _dt.timedelta(milliseconds=ms)
    except OverflowError:  # before year 1 (a cutoff of millennia ago)
        return f"{ms} ms since the epoch"
    return stamp.isoformat(timespec="milliseconds") + "Z"


_ISO_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|z|[+-]\d{2}:?\d{2}(?::?\d{2})?)?$"
)


_fromisoformat = _dt.datetime.fromisoformat


def parse_iso_ms(text: str) -> int:
    """Epoch ms of an ISO-8601 timestamp: `T` or space, optional fraction, `Z`/offset/none (= UTC)."""
    if len(text) == 24 and text[23] == "Z" and text[10] == "T":
        # The exact form we and the TypeScript adapters write: the fast path.
        return (_dt.datetime.fromisoformat(text[:23]) - _EPOCH) // _MS
    match = _ISO_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    date, time, fraction, zone = match.groups()
    fraction = (fraction or "")[:6].ljust(6, "0")
    stamp = _dt.datetime.fromisoformat(f"{date}T{time}.{fraction}")
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = _dt.timedelta(hours=int(digits[0:2]), minutes=int(digits[2:4]),
                               seconds=int(digits[4:6] or 0))
        stamp -= sign * offset
    return (stamp - _EPOCH) // _MS


def sqlite_encode_ts(ms: int) -> str:
    """Epoch ms as SQLite stores a timestamp: ISO 8601 text in UTC, to the millisecond."""
    # Exactly YYYY-MM-DDTHH:MM:SS.mmmZ: the TypeScript side orders these as text.
    return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds") + "Z"


def sqlite_decode_ts(value: Any) -> int:
    """Epoch ms of a timestamp as SQLite returns it (the ISO text `sqlite_encode_ts` writes)."""
    if type(value) is str and len(value) == 24 and value[23] == "Z" and value[10] == "T":
        # parse_iso_ms's fast path inlined: every timestamp of every row read comes here.
        return (_fromisoformat(value[:23]) - _EPOCH) // _MS
    if isinstance(value, str):
        return parse_iso_ms(value)
    if isinstance(value, int):
        return value  # epoch ms written by hand into a TEXT column
    if isinstance(value, _dt.datetime):
        return datetime_to_ms(value)
    raise ValueError(f"cannot read a timestamp from {value!r}")


def datetime_to_ms(value: Any) -> int:
    """Epoch ms of a timestamp as PostgreSQL or MySQL return it (a datetime, naive is UTC; or ISO text)."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            return (value - _EPOCH_UTC) // _MS
        return (value - _EPOCH) // _MS
    if isinstance(value, str):
        return parse_iso_ms(value)
    raise ValueError(f"cannot read a timestamp from {value!r}")


def mysql_encode_ts(ms: int) -> _dt.datetime:
    """Epoch ms as a MySQL/MariaDB DATETIME(3) parameter."""
    # DATETIME(3) holds naive UTC.
    return _EPOCH + ms * _MS


def postgres_encode_ts(ms: int) -> _dt.datetime:
    """Epoch ms as a PostgreSQL timestamptz parameter (an aware UTC datetime)."""
    return _EPOCH_UTC + ms * _MS


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> _dt.timedelta:
    """A `timedelta` from ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` or combinations (``1h30m``).

    :raises ValueError: for anything else (a bare number is refused: say which unit).
    """
    compact = str(text).strip().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"invalid duration {text!r} (use e.g. 30s, 15m, 12h, 7d, 1h30m)")
    total = _dt.timedelta()
    for number, unit in parts:
        total += _dt.timedelta(**{_UNITS[unit.lower()]: float(number)})
    return total
