"""What the tables hold, for the command line's ``stats``: rows per table, runs per status."""
from __future__ import annotations

from typing import Any, Dict, Optional

import peewee

from .batches import COUNT
from .domains import ALL_DOMAINS, models_in
from .executor import Executor
from .tables import StorageParts

__all__ = ["stats"]


def stats(storage: StorageParts) -> Dict[str, Any]:
    """Rows per table, runs per status, and the oldest and newest run (by ``startedAt``).

    Only the tables of the storage's domains are counted (`peewee_storage(db, domains=...)`);
    without the runs domain, ``runs`` is empty and the oldest and newest run None.

    :param storage: the storage object (`peewee_storage`).
    :returns: ``{"tables": {table: rows}, "runs": {status: count}, "oldestRun": ms | None,
        "newestRun": ms | None}``, timestamps in epoch ms.
    """
    executor, m = storage.executor, storage.models
    domains = getattr(storage, "domains", ALL_DOMAINS)
    tables = {model._meta.table_name: executor.rows(model.select(COUNT))[0][0]
              for model in models_in(m.in_dependency_order(), domains)}
    if "runs" not in domains:
        return {"tables": tables, "runs": {}, "oldestRun": None, "newestRun": None}
    Run = m.run
    by_status = {status: count for status, count in
                 executor.rows(Run.select(Run.status, COUNT).group_by(Run.status).order_by(Run.status))}
    (oldest, newest), = executor.rows(Run.select(peewee.fn.MIN(Run.started_at),
                                                 peewee.fn.MAX(Run.started_at)))
    return {
        "tables": tables,
        "runs": by_status,
        # MIN/MAX come back as the driver reads the column: decode them as a mapper would.
        "oldestRun": _as_ms(executor, oldest),
        "newestRun": _as_ms(executor, newest),
    }


def _as_ms(executor: Executor, value: Any) -> Optional[int]:
    if value is None or isinstance(value, int):
        return value
    ms: int = executor.dialect.decode_ts(value)
    return ms
