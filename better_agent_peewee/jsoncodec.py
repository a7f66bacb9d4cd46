"""JSON text as Better Agent writes it: compact, at any nesting depth, exact on every dialect.

`dumps` writes what ``JSON.stringify`` writes (NaN and Infinity refused: PostgreSQL cannot
store them); `load_text` reads it back. Both take the C codecs' fast path and fall back to
an explicit stack when a value is nested deeper than Python's recursion allows, so a deep
value written by any client stays readable. `dumps_for_jsonb` keeps large floats floats
through PostgreSQL's jsonb (see "Encodings" in docs/contract.md).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Dict, List, Set, Tuple, cast

__all__ = ["dumps", "dumps_for_jsonb", "load_text", "load_native"]

# Compact JSON, as JSON.stringify writes it; NaN/Infinity are refused (PostgreSQL cannot store them).
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_encode: Callable[[Any], str] = _encoder.encode
_loads = json.loads
# The C scanner behind json.loads, called directly on the hot path (row decoding): it skips
# json.loads' per-call Python layers (type checks, BOM test, two whitespace regexes).
_scan_once: Callable[[str, int], Tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def dumps(value: Any) -> str:
    """Compact JSON text of `value`, at any nesting depth."""
    try:
        return _encode(value)
    except RecursionError:
        # The C encoder recurses once per level: deep values (about 1,000 levels, fewer on a
        # deep call stack) take the iterative path, which writes the very same text.
        return _dumps_iterative(value, _encode)


def load_text(value: Any) -> Any:
    """Decode JSON that the driver hands back as text (SQLite, MySQL, MariaDB; PostgreSQL as text)."""
    if type(value) is str:
        # Fast path for the text we and the TypeScript adapters write: one JSON document with
        # no surrounding whitespace. Anything else (whitespace, errors, deep nesting) takes
        # the general path below, which decides exactly as json.loads does.
        try:
            obj, end = _scan_once(value, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if end == len(value):
                return obj
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return _loads(value)
        except RecursionError:
            # Nested deeper than the decoder's recursion allows (possibly written by another
            # client): decode without recursion rather than make the row unreadable.
            return _loads_iterative(value)
    return value  # a driver (or a user's adapter) that already decoded it


# -- JSON without recursion (slow paths, only taken when the C codecs hit the recursion limit)

def _json_key(key: Any, scalar: Callable[[Any], str]) -> str:
    # The C encoder's rules for object keys (JSON.stringify would have had strings only).
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return scalar(key)
    if isinstance(key, (int, float)):
        return scalar(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _dumps_iterative(value: Any, scalar: Callable[[Any], str]) -> str:
    """The text `dumps` writes, built with an explicit stack; `scalar` encodes the leaves."""
    parts: List[str] = []
    stack: List[Any] = []  # [iterator, closing bracket, is_object, first, id]
    open_ids: Set[int] = set()
    item = value
    while True:
        if isinstance(item, dict) or isinstance(item, (list, tuple)):
            marker = id(item)
            if marker in open_ids:
                raise ValueError("Circular reference detected")
            open_ids.add(marker)
            is_object = isinstance(item, dict)
            parts.append("{" if is_object else "[")
            stack.append([iter(cast(Dict[Any, Any], item).items()) if is_object else iter(item),
                          "}" if is_object else "]",
                          is_object, True, marker])
        else:
            parts.append(scalar(item))
        while stack:
            top = stack[-1]
            try:
                nxt = next(top[0])
            except StopIteration:
                parts.append(top[1])
                open_ids.discard(top[4])
                stack.pop()
                continue
            if not top[3]:
                parts.append(",")
            top[3] = False
            if top[2]:
                key, nxt = nxt
                parts.append(_encode(_json_key(key, scalar)))
                parts.append(":")
            item = nxt
            break
        else:
            return "".join(parts)


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_CONSTANTS = (("true", True), ("false", False), ("null", None))


# The str scanner json.decoder uses (C or pure Python): real, but not in the stdlib stubs.
_scanstring: Callable[[str, int], Tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _loads_iterative(text: str) -> Any:
    """`json.loads(text)` for standard JSON, with an explicit stack instead of recursion."""
    scanstring = _scanstring

    def fail(pos: int) -> ValueError:
        return ValueError(f"invalid JSON at character {pos}: {text[pos:pos + 20]!r}")

    def read_key(pos: int) -> Tuple[str, int]:
        if text[pos:pos + 1] != '"':
            raise fail(pos)
        key, pos = scanstring(text, pos + 1)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] != ":":
            raise fail(pos)
        return key, _WS.match(text, pos + 1).end()  # type: ignore[union-attr]

    stack: List[List[Any]] = []  # [container, key (None in an array)]
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    while True:
        char = text[pos:pos + 1]
        if char == "{" or char == "[":
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            if text[pos:pos + 1] == ("}" if char == "{" else "]"):
                value: Any = {} if char == "{" else []
                pos += 1
            elif char == "{":
                key, pos = read_key(pos)
                stack.append([{}, key])
                continue
            else:
                stack.append([[], None])
                continue
        elif char == '"':
            value, pos = scanstring(text, pos + 1)
        else:
            match = _NUMBER.match(text, pos)
            if match is not None:
                whole, fraction, exponent = match.groups()
                if fraction or exponent:
                    value = float(whole + (fraction or "") + (exponent or ""))
                else:
                    value = int(whole)
                pos = match.end()
            else:
                for word, constant in _CONSTANTS:
                    if text.startswith(word, pos):
                        value, pos = constant, pos + len(word)
                        break
                else:
                    raise fail(pos)
        while True:  # hand `value` to its container; close the containers that end here
            if not stack:
                pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
                if pos != len(text):
                    raise fail(pos)
                return value
            top = stack[-1]
            container = top[0]
            if top[1] is None:
                container.append(value)
            else:
                container[top[1]] = value
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            char = text[pos:pos + 1]
            if char == ",":
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                if top[1] is not None:
                    top[1], pos = read_key(pos)
                break
            if char != ("]" if top[1] is None else "}"):
                raise fail(pos)
            pos += 1
            stack.pop()
            value = container


# PostgreSQL's jsonb keeps numbers as `numeric` and prints them without an exponent: the
# float 1e+23 comes back as the integer 100000000000000000000000 (a different value for
# Python). Floats that Python writes with a positive exponent are therefore written as
# their exact integral value plus ".0", which jsonb keeps as it is.
_POSITIVE_EXPONENT = re.compile(r"[0-9]e\+[0-9]")


def _exact_float_scalar(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        text = float.__repr__(value)
        return f"{int(value)}.0" if "e+" in text else text
    return _encode(value)


def dumps_for_jsonb(value: Any) -> str:
    """`dumps`, except that large floats are written so that jsonb keeps them floats."""
    text = dumps(value)
    if "e+" in text and _POSITIVE_EXPONENT.search(text):  # cheap test first; rare
        return _dumps_iterative(value, _exact_float_scalar)
    return text


def load_native(value: Any) -> Any:
    """PostgreSQL's drivers decode json/jsonb themselves: a str here is a JSON string value."""
    return value
