"""Aggregates in SQL, each database its own: hour numbers, durations, merges of index ranges.

The inspector's charts count runs per hour and measure durations in the database, over the
same bounded index ranges it would otherwise send back whole (and decode row by row here).
Each expression works on the stored form of a timestamp (see "Encodings" in docs/contract.md)
and agrees with what `Dialect.decode_ts` makes of it for timestamps in the stored form this
package and the TypeScript adapters write (whole milliseconds). A hand-written SQLite text with
finer digits may land on the next millisecond (``julianday`` rounds where `decode_ts` cuts).
"""
from __future__ import annotations

import peewee

__all__ = ["Aggregates", "template"]


class Aggregates:
    """What a `Dialect` computes in SQL for the inspector's charts (each dialect overrides the methods)."""

    #: ``(arm) UNION ALL (arm) ORDER BY t LIMIT n`` needs a LIMIT in each arm to stay bounded (a
    #: server that gathers the arms before it sorts them). SQLite merges arms that an index keeps
    #: in order and stops at the outer LIMIT, and takes no LIMIT in an arm.
    limits_union_arms = True

    def hour_number(self, column: peewee.Node) -> peewee.Node:
        """Whole UTC hours since the epoch of a timestamp column (its hour's start // 3,600,000 ms)."""
        raise NotImplementedError

    def milliseconds_between(self, start: peewee.Node, end: peewee.Node) -> peewee.Node:
        """`end` minus `start` in whole milliseconds (NULL where either is NULL)."""
        raise NotImplementedError


def template(sql: str, *nodes: peewee.Node) -> peewee.Node:
    """`sql` with each ``{}`` replaced by the next of `nodes` (a column, a subexpression)."""
    parts = sql.split("{}")
    if len(parts) != len(nodes) + 1:
        raise ValueError(f"{sql!r} has {len(parts) - 1} places for {len(nodes)} nodes")
    items: list[peewee.Node] = [peewee.SQL(parts[0])]
    for node, text in zip(nodes, parts[1:]):
        items += [node, peewee.SQL(text)]
    return peewee.NodeList(items, glue="")
