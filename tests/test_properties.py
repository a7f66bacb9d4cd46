"""Property tests, with hypothesis, on every dialect.

1. For generated records of every table, `set` then `get` (and `list`) is the identity.
2. For generated sets of run records and generated queries, `list` returns exactly what
   a pure-Python reference of "The interface" (docs/contract.md) returns: `where` (all fields match,
   None matches an absent field), `orderBy` over several fields in the dict's order with
   NULLs last in both directions, `take`. Where the ordering does not decide between two
   records (ties), any order of the tied records is accepted, and so is any choice among
   tied records cut by `take`.

One storage per dialect for the module; each example empties the tables first (hypothesis
runs many examples inside one test call, so function-scoped fixtures would be shared).
Example counts are modest for CI: ``BAP_HYPOTHESIS_EXAMPLES`` (default 25 per test and
dialect) raises them.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Iterator, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from better_agent_peewee import peewee_storage
from better_agent_peewee.records import MAX_SEQ
from better_agent_peewee.timestamps import MAX_TIMESTAMP_MS
from tests.samples import DIALECT_PARAMS, message_key, module_database, wipe
from tests.test_hostile import canonical

EXAMPLES = int(os.environ.get("BAP_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", params=DIALECT_PARAMS)
def storage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    for db in module_database(request, request.param, tmp_path_factory):
        yield peewee_storage(db)


# -- strategies ------------------------------------------------------------------------------------

# Any Unicode a record can hold: no lone surrogates (Cs), no NUL (refused on every dialect).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TEXT = st.text(CHARS, max_size=30)
KEY = st.text(CHARS, min_size=1, max_size=40).filter(lambda s: not s.endswith(" "))
SHORT = st.text(CHARS, max_size=12)  # values likely to collide, for where / orderBy
TS = st.integers(0, MAX_TIMESTAMP_MS)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
OBJECT = st.dictionaries(TEXT, JSON, max_size=4)


def optional(record: Dict[str, Any], field: str, value: Any) -> None:
    if value is not None:
        record[field] = value


@st.composite
def threads(draw: Any, key: Any = KEY) -> Dict[str, Any]:
    rec = {"id": draw(key), "agentName": draw(SHORT), "createdAt": draw(TS), "updatedAt": draw(TS)}
    optional(rec, "scope", draw(st.none() | SHORT))
    optional(rec, "title", draw(st.none() | st.text(CHARS, max_size=300)))
    if draw(st.booleans()):
        rec["state"] = draw(JSON)  # JSON null included: it reads back as None
    optional(rec, "metadata", draw(st.none() | OBJECT))
    return rec


@st.composite
def runs(draw: Any, key: Any = KEY) -> Dict[str, Any]:
    rec = {"runId": draw(key), "agentName": draw(SHORT),
           "status": draw(st.sampled_from(["running", "completed", "failed", "interrupted", "aborted"])),
           "config": draw(JSON), "startedAt": draw(TS), "updatedAt": draw(TS)}
    optional(rec, "threadId", draw(st.none() | SHORT))
    optional(rec, "scope", draw(st.none() | SHORT))
    optional(rec, "abortRequestedAt", draw(st.none() | TS))
    optional(rec, "finishedAt", draw(st.none() | TS))
    if draw(st.booleans()):
        rec["finalEvent"] = {**draw(OBJECT), "type": draw(st.sampled_from(["RUN_FINISHED", "RUN_ERROR"]))}
    return rec


@st.composite
def streams(draw: Any) -> Dict[str, Any]:
    rec = {"runId": draw(KEY), "status": draw(st.sampled_from(["open", "closed"])),
           "createdAt": draw(TS), "updatedAt": draw(TS)}
    optional(rec, "closedAt", draw(st.none() | TS))
    return rec


@st.composite
def events(draw: Any) -> Dict[str, Any]:
    run_id = draw(st.text(CHARS, min_size=1, max_size=30).filter(lambda s: not s.endswith(" ")))
    seq = draw(st.integers(1, MAX_SEQ))
    return {"id": f"{run_id}:{seq}", "runId": run_id, "seq": seq, "timestamp": draw(TS),
            "event": draw(OBJECT)}


@st.composite
def messages(draw: Any) -> Dict[str, Any]:
    body = draw(st.dictionaries(TEXT.filter(lambda k: k not in ("threadId", "runId", "createdAt",
                                                                "id", "role")),
                                JSON, max_size=3))
    rec = {**body, "id": draw(KEY), "role": draw(SHORT), "content": draw(JSON),
           "threadId": draw(st.text(CHARS, min_size=1, max_size=40).filter(lambda s: not s.endswith(" "))),
           "createdAt": draw(TS)}
    optional(rec, "runId", draw(st.none() | SHORT))
    return rec


# -- 1. set then get is the identity -------------------------------------------------------------


def read_back(table: str, rec: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(rec)
    if table == "streams":
        out.pop("id", None)
    return out


@pytest.mark.parametrize("table,strategy", [("memoryThreads", threads()), ("runs", runs()),
                                            ("streams", streams()), ("streamEvents", events()),
                                            ("memoryMessages", messages())],
                         ids=["threads", "runs", "streams", "events", "messages"])
def test_set_then_get_is_identity(storage: Any, table: str, strategy: Any) -> None:
    @SETTINGS
    @given(records=st.lists(strategy, min_size=1, max_size=4))
    def check(records: List[Dict[str, Any]]) -> None:
        wipe(storage.database)
        stored: Dict[str, Dict[str, Any]] = {}
        for rec in records:
            if table == "memoryMessages":
                key = message_key(rec)
                if len(key) > 255:
                    continue
                if storage.get("memoryThreads", rec["threadId"]) is None:
                    storage.set("memoryThreads", rec["threadId"],
                                {"id": rec["threadId"], "agentName": "a", "createdAt": 0, "updatedAt": 0})
            else:
                key = rec["id"] if table in ("memoryThreads", "streamEvents") else rec["runId"]
            storage.set(table, key, rec)
            stored[key] = rec  # a later record under the same key replaces the earlier one
        for key, rec in stored.items():
            got = storage.get(table, key)
            assert got is not None and canonical(got) == canonical(read_back(table, rec)), (key, got, rec)
        items = storage.list(table)["items"]
        assert sorted(canonical(i) for i in items) == sorted(canonical(read_back(table, r))
                                                             for r in stored.values())

    check()


# -- 2. list equals the reference of "The interface" ------------------------------------------------

RUN_FIELDS = ("runId", "agentName", "threadId", "scope", "status", "abortRequestedAt", "startedAt",
              "updatedAt", "finishedAt")


def reference_compare(order: Dict[str, str]) -> Any:
    """The ordering of "The interface": fields in dict order, NULL/absent last in both directions."""
    def compare(a: Dict[str, Any], b: Dict[str, Any]) -> int:
        for field, direction in order.items():
            x, y = a.get(field), b.get(field)
            if x is None or y is None:
                if x is None and y is None:
                    continue
                return 1 if x is None else -1  # NULLs last, whatever the direction
            if x != y:
                result = -1 if x < y else 1
                return result if direction == "asc" else -result
        return 0
    return compare


def reference_list(records: List[Dict[str, Any]], query: Dict[str, Any]) -> List[Dict[str, Any]]:
    where = query.get("where", {})
    out = [r for r in records
           if all((r.get(f) is None) if v is None else (r.get(f) == v and type(r.get(f)) is type(v))
                  for f, v in where.items())]
    return sorted(out, key=functools.cmp_to_key(reference_compare(query.get("orderBy", {}))))


@st.composite
def run_sets_and_queries(draw: Any) -> Any:
    # Few distinct values per field, so that where matches and orderBy ties happen often.
    pool_text = draw(st.lists(SHORT, min_size=1, max_size=3))
    pool_ts = draw(st.lists(TS, min_size=1, max_size=3))
    text = st.sampled_from(pool_text)
    ts = st.sampled_from(pool_ts)
    records = []
    for i in range(draw(st.integers(0, 12))):
        rec: Dict[str, Any] = {"runId": f"run-{i}-{draw(SHORT)}".rstrip(" ") + "x", "agentName": draw(text),
                               "status": draw(st.sampled_from(["running", "completed", "failed"])),
                               "config": None, "startedAt": draw(ts), "updatedAt": draw(ts)}
        for field in ("threadId", "scope"):
            optional(rec, field, draw(st.none() | text))
        for field in ("abortRequestedAt", "finishedAt"):
            optional(rec, field, draw(st.none() | ts))
        records.append(rec)
    value_for = {f: (ts if f in ("abortRequestedAt", "startedAt", "updatedAt", "finishedAt") else
                     st.sampled_from(["running", "completed", "failed", "aborted"]) if f == "status" else
                     text)
                 for f in RUN_FIELDS}
    where_fields = draw(st.lists(st.sampled_from(RUN_FIELDS), unique=True, max_size=2))
    where = {f: draw(st.none() | value_for[f]) for f in where_fields}
    order = {f: draw(st.sampled_from(["asc", "desc"]))
             for f in draw(st.lists(st.sampled_from(RUN_FIELDS), unique=True, max_size=3))}
    query: Dict[str, Any] = {}
    if where:
        query["where"] = where
    if order:
        query["orderBy"] = order
    take = draw(st.none() | st.integers(0, len(records) + 2))
    if take is not None:
        query["take"] = take
    return records, query


def test_list_matches_the_reference(storage: Any) -> None:
    @SETTINGS
    @given(case=run_sets_and_queries())
    def check(case: Any) -> None:
        records, query = case
        wipe(storage.database)
        for rec in records:
            storage.set("runs", rec["runId"], rec)
        got = storage.list("runs", query)["items"]
        expected = reference_list(records, query)
        take: Optional[int] = query.get("take")
        want = len(expected) if take is None else min(take, len(expected))
        assert len(got) == want, (query, got, expected)
        ids = [r["runId"] for r in got]
        assert len(set(ids)) == len(ids)
        by_id = {r["runId"]: r for r in records}
        assert set(ids) <= {r["runId"] for r in expected}, "list returned a record the query does not match"
        for item in got:
            assert canonical(item) == canonical(read_back("runs", by_id[item["runId"]]))
        compare = reference_compare(query.get("orderBy", {}))
        # In order (ties in any order) ...
        for a, b in zip(got, got[1:]):
            assert compare(by_id[a["runId"]], by_id[b["runId"]]) <= 0, ("out of order", query, ids)
        # ... and, with take, the first records of that order: nothing left out comes before
        # something returned (records tied at the cut may go either way).
        left_out = [r for r in expected if r["runId"] not in set(ids)]
        for i in ids:
            for r in left_out:
                assert compare(by_id[i], r) <= 0, ("take cut the wrong records", query, ids)

    check()
