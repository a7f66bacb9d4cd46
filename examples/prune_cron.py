"""The nightly cleanup a cron job or systemd timer runs: prune finished runs, reap dead ones.

    DATABASE_URL=postgresql://app:secret@db/app python examples/prune_cron.py

Settings come from the environment, so the crontab line stays short:

    DATABASE_URL       the database (default sqlite:///agent.db), playhouse.db_url form
    PRUNE_OLDER_THAN   keep finished runs this long (default 7d; 30s, 15m, 12h, 7d, 2w)
    PRUNE_REAP_STALE   first mark runs still running but silent this long as failed
                       (e.g. 2h; default: off -- only set it longer than your longest step)
    PRUNE_BATCH_SIZE   runs per transaction (default 1000)

It logs one summary line (and a warning per reaped batch) on stderr and exits 0, or logs
the error and exits 1 -- cron mails the output of a failed run to the job's owner. A run
killed part-way (a reboot, a timeout) leaves every remaining run whole; the next run
finishes the job.
"""
from __future__ import annotations

import logging
import os
import sys

from better_agent_peewee import open_database, peewee_storage
from better_agent_peewee.cli import parse_duration

log = logging.getLogger("prune_cron")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        older_than = parse_duration(os.environ.get("PRUNE_OLDER_THAN", "7d"))
        reap = os.environ.get("PRUNE_REAP_STALE", "").strip()
        stale_after = parse_duration(reap) if reap else None
        batch_size = int(os.environ.get("PRUNE_BATCH_SIZE", "1000"))
        database = open_database(os.environ.get("DATABASE_URL", "sqlite:///agent.db"))
        storage = peewee_storage(database)
        if stale_after is not None:
            reaped = storage.runs.reap_stale(stale_after)
            log.info("reaped %d stale run%s (running, silent for %s)", reaped, "" if reaped == 1 else "s",
                     reap)
        report = storage.runs.prune(older_than, batch_size=batch_size)
        log.info("%s", report.summary())
    except Exception as exc:  # one line in the cron mail; the traceback only with DEBUG
        log.error("prune failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    finally:
        if "database" in locals():
            database.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
