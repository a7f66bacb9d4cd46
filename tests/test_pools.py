"""Pooled databases across threads: what a threaded web server does with `open_database(url, pooled=True)`.

A pool gives each connection to one thread at a time but to many threads over its life;
the bug these tests pin down (pooled SQLite refusing a connection another thread made)
only shows when several threads take turns on the pool's connections.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List

import peewee
import pytest
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

from better_agent_peewee import DialectError, PoolExhaustedError, create_tables, peewee_storage
from better_agent_peewee.cli import POOL_WAIT_SECONDS, open_database

POOL_CLASSES = {"sqlite": PooledSqliteDatabase, "postgres": PooledPostgresqlDatabase,
                "mysql": PooledMySQLDatabase}
NOW = 1_700_000_000_000


def _hammer(storage: Any, db: peewee.Database, workers: int = 10, rounds: int = 20) -> List[Any]:
    """Every worker thread reads and writes, then returns its connection, `rounds` times."""

    def request(i: int) -> Any:
        try:
            thread_id = f"t{i % 7}"
            storage.memory.threads.set(thread_id, {"id": thread_id, "agentName": "a", "createdAt": NOW,
                                                   "updatedAt": NOW + i})
            return len(storage.memory.threads.list(agent_name="a"))
        except Exception as exc:  # collected, so the assertion shows every failure kind
            return exc
        finally:
            if not db.is_closed():
                db.close()  # back to the pool: the next request may run on another thread

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(request, range(workers * rounds)))


def test_open_database_pooled_sqlite_serves_many_threads(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'agent.db'}", pooled=True, max_connections=4)
    create_tables(db)
    storage = peewee_storage(db)
    results = _hammer(storage, db)
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    assert all(isinstance(r, int) and 1 <= r <= 7 for r in results)
    db.close_all()


def test_pooled_sqlite_url_scheme_serves_many_threads(tmp_path: Path) -> None:
    db = open_database(f"sqlite+pool:///{tmp_path / 'agent.db'}?max_connections=3")
    assert db.connect_params["check_same_thread"] is False
    create_tables(db)
    failures = [r for r in _hammer(peewee_storage(db), db, workers=6, rounds=10) if isinstance(r, Exception)]
    assert not failures, failures[:3]
    db.close_all()


def test_pooled_sqlite_that_cannot_cross_threads_is_refused(tmp_path: Path) -> None:
    db = PooledSqliteDatabase(str(tmp_path / "agent.db"))
    with pytest.raises(DialectError, match="check_same_thread=False"):
        peewee_storage(db)
    # What the message says to do works.
    fixed = PooledSqliteDatabase(str(tmp_path / "agent.db"), check_same_thread=False)
    create_tables(fixed)
    assert peewee_storage(fixed).memory.threads.get("none") is None
    fixed.close_all()


def test_open_database_pool_waits_by_default() -> None:
    for url in ("sqlite:///agent.db", "postgresql://app@db.internal/app", "mysql://app@db.internal/app"):
        assert open_database(url, pooled=True)._wait_timeout == POOL_WAIT_SECONDS
        assert open_database(url, pooled=True, timeout=3)._wait_timeout == 3
    # The URL's own setting wins over the default.
    assert open_database("postgresql+pool://app@db.internal/app?timeout=7")._wait_timeout == 7
    assert open_database("sqlite+pool:///agent.db?check_same_thread=true").connect_params[
        "check_same_thread"] is True


def test_pool_shared_by_many_threads(dialect: str, make_database: Callable[..., peewee.Database]) -> None:
    extra = {"check_same_thread": False} if dialect == "sqlite" else {}
    db = make_database(POOL_CLASSES[dialect], max_connections=4, timeout=10, **extra)
    create_tables(db)
    storage = peewee_storage(db)
    results = _hammer(storage, db, workers=12, rounds=10)  # more threads than connections: they wait
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    db.close_all()


def test_exhausted_pool_waits_then_says_what_to_change(dialect: str,
                                                       make_database: Callable[..., peewee.Database]) -> None:
    extra = {"check_same_thread": False} if dialect == "sqlite" else {}
    db = make_database(POOL_CLASSES[dialect], max_connections=1, timeout=1, **extra)
    create_tables(db)
    storage = peewee_storage(db)
    db.close()  # the setup's connection back to the pool: the holder thread takes the only one
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        storage.runs.get("r")  # takes the only connection
        holding.set()
        release.wait(30)
        db.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        started = time.monotonic()
        with pytest.raises(PoolExhaustedError, match="max_connections") as info:
            storage.runs.get("r")
        assert time.monotonic() - started >= 0.9  # it waited for the pool's timeout first
        assert "all 1 connections" in str(info.value) and "timeout" in str(info.value)
        with pytest.raises(PoolExhaustedError):
            with storage.transaction():
                pass
        # Returned in time, a connection is taken by the waiting thread.
        later = threading.Timer(0.3, release.set)
        later.start()
        assert storage.runs.get("r") is None
    finally:
        release.set()
        holder.join()
        db.close()
        db.close_all()
