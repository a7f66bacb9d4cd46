"""Interleaved timing of two sides (adapter, baseline), result rows and the printed table."""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

#: A side of a comparison: given n, prepare the inputs for n operations (not timed) and
#: return a function that performs them (timed).
Prepare = Callable[[int], Callable[[], Any]]


@dataclasses.dataclass
class Settings:
    """How hard to measure: rounds of A/B batches, and the wall time one batch aims for."""

    rounds: int = 15
    batch_seconds: float = 0.1
    min_ops: int = 5
    max_ops: int = 20000
    quick: bool = False


@dataclasses.dataclass
class Comparison:
    """Median cost per operation of each side over interleaved rounds."""

    ops: int  # operations per batch
    adapter_seconds: List[float]  # per-op seconds, one per round
    baseline_seconds: List[float]

    @property
    def adapter_ops(self) -> float:
        return 1.0 / statistics.median(self.adapter_seconds)

    @property
    def baseline_ops(self) -> float:
        return 1.0 / statistics.median(self.baseline_seconds)

    @property
    def ratio(self) -> float:
        """Adapter cost / baseline cost (> 1: the adapter is slower): the median of the rounds' ratios.

        Each round pairs an adapter batch with the baseline batch next to it, so slow phases
        of the machine (fsync stalls, server checkpoints) hit both sides of one pair alike.
        """
        return statistics.median(a / b for a, b in zip(self.adapter_seconds, self.baseline_seconds))


def _timed(prepare: Prepare, n: int) -> float:
    run = prepare(n)
    gc.collect()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def compare(adapter: Prepare, baseline: Prepare, settings: Settings) -> Comparison:
    """Run adapter and baseline batches alternately (A B, B A, ...) and collect per-op costs.

    Warm-up batches of each side size the batches so that one takes about
    `settings.batch_seconds`; both sides run the same number of operations.
    """
    probe = settings.min_ops
    # Sized by the faster of three probes of each side: one hiccup of a busy machine in a single
    # short probe would otherwise make every batch tiny, and each round's pair noisy.
    warm = max(min(_timed(adapter, probe) for _ in range(3)),
               min(_timed(baseline, probe) for _ in range(3))) / probe
    ops = int(settings.batch_seconds / warm) if warm > 0 else settings.max_ops
    ops = max(settings.min_ops, min(settings.max_ops, ops))
    a: List[float] = []
    b: List[float] = []
    for r in range(settings.rounds):
        # Alternate which side goes first so drift (cache, server checkpoints) hits both alike.
        order = ((adapter, a), (baseline, b)) if r % 2 == 0 else ((baseline, b), (adapter, a))
        for prepare, into in order:
            into.append(_timed(prepare, ops) / ops)
    return Comparison(ops, a, b)


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    workload: str  # "W1"
    title: str
    adapter: Optional[float]  # the adapter's number (ops/s, ms, s, MB ... see unit)
    baseline: Optional[float]  # the baseline's number, same unit (None when there is none)
    unit: str
    ratio: Optional[float]
    target: str
    passed: Optional[bool]  # None: no target or not measured
    note: str = ""
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def ratio_row(workload: str, title: str, c: Comparison, limit: float, note: str = "",
              **details: Any) -> Row:
    """A W1-W7 row: adapter vs baseline ops/s, PASS when the cost ratio is within `limit`."""
    return Row(workload, title, c.adapter_ops, c.baseline_ops, "ops/s", c.ratio, f"ratio <= {limit:g}",
               c.ratio <= limit, note,
               dict(details, ops_per_batch=c.ops, adapter_s_per_op=c.adapter_seconds,
                    baseline_s_per_op=c.baseline_seconds))


def missing_row(workload: str, title: str, why: str) -> Row:
    """A row for a workload that could not run (e.g. the helper it measures is not there)."""
    return Row(workload, title, None, None, "", None, "", None, why)


def _num(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ops/s":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"


def format_table(dialect: str, rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (pasteable into the README)."""
    head = ["workload", "adapter", "baseline", "ratio", "target", "result"]
    lines = []
    for r in rows:
        unit = "" if r.unit == "ops/s" else r.unit
        result = "-" if r.passed is None else ("PASS" if r.passed else "MISS")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        title = f"{r.workload} {r.title}" + (f" ({r.note})" if r.note else "")
        lines.append([title, _num(r.adapter, unit or "ops/s") if not unit else _num(r.adapter, unit),
                      _num(r.baseline, unit or "ops/s") if not unit else _num(r.baseline, unit),
                      ratio, r.target or "-", result])
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i])
              for i in range(len(head))]
    right = {1, 2, 3}

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([f"{dialect}:", "", fmt(head), sep, *(fmt(line) for line in lines)])


LEGEND = """\
adapter / baseline: operations per second (median of interleaved rounds), or the unit shown.
ratio: adapter cost / baseline cost, the median over rounds of each round's pair (lower is better).
W8 first row: both columns are the adapter, polling the long and the short stream; its ratio is
the cost growth with stream length. W9: append-to-receipt latency through resume.
W10: prune in a fresh process; RSS growth is its peak resident memory minus that before the call."""
