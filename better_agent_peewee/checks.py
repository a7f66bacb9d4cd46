"""Argument checks shared by every layer (it imports nothing of the package).

``bool`` is a subclass of ``int`` in Python, so ``isinstance(True, int)`` holds: a count, a
timestamp or a number of seconds given as ``True`` would pass for 1. Every such check asks
`is_int` instead.
"""
from __future__ import annotations

__all__ = ["is_int"]

_NUMBER = (int, float)


def is_int(value: object, *, or_float: bool = False) -> bool:
    """True when `value` is an int (with `or_float`, an int or a float), never a bool.

    :param value: what the caller passed.
    :param or_float: accept floats too (seconds, intervals).
    """
    return isinstance(value, _NUMBER if or_float else int) and not isinstance(value, bool)
