"""Benchmarks of better_agent_peewee against hand-written SQL through the raw driver.

Run ``python -m bench --dialect sqlite|postgres|mysql|all [--quick] [--rounds N] [--json PATH]``
from the repository root. Each workload (W1-W10, see `bench.workloads`) runs the adapter and a
baseline -- the minimal SQL for the same job through ``sqlite3`` / psycopg2 / pymysql, with the
same durability and the same record encoding -- side by side in one process, interleaved, and
prints adapter ops/s, baseline ops/s, their ratio and PASS/MISS against the target.

This is not a test suite: nothing here asserts on time. ``--quick`` is the smoke run CI uses.
"""
