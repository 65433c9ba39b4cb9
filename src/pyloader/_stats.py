"""Per-epoch figures for :meth:`pyloader.Prefetcher.stats`, in memory that does not grow with the run.

The engine (``_C.Engine.stats()``) keeps the latest epochs in detail and merges older ones into
one record; a record's per-batch load times are a fixed log-scale histogram (``csrc/core/
histogram.h``: bucket ``b`` holds the times in ``[LOAD_US_BUCKETS[b], LOAD_US_BUCKETS[b + 1])``
microseconds). :class:`EpochRecords` does the same across the engines a Prefetcher runs (each
``load_state_dict``, ``set_epoch`` or renewal starts a new one): the last :data:`WINDOW` epochs in
detail, the rest merged into ``earlier``. :func:`summarize` turns a record into the dict users see.

Percentiles come from the histogram: the bucket holding the order statistic of rank
``floor(q * (n - 1))``, reported as its midpoint (exact below 16 µs, else within 3.1% of that
order statistic).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from . import _C

WINDOW = 64  # epochs kept in detail (the engine keeps as many: EngineOptions::stats_window)

_BOUNDS = np.asarray(_C.LOAD_US_BUCKETS, dtype=np.float64)
_EXACT = np.diff(_BOUNDS) == 1  # buckets of one value each
_MIDDLE = np.where(_EXACT, _BOUNDS[:-1], (_BOUNDS[:-1] + _BOUNDS[1:] - 1) / 2)


def percentile_us(counts: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of the load times a histogram counts, in microseconds."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    rank = int(q / 100.0 * (total - 1))  # 0-based order statistic
    bucket = int(np.searchsorted(np.cumsum(counts), rank + 1))
    return float(_MIDDLE[bucket])


def merge(into: dict[str, Any] | None, later: dict[str, Any]) -> dict[str, Any]:
    """Record ``later`` added to ``into`` (a copy of ``later`` when ``into`` is None)."""
    if into is None:
        return dict(later, load_us=np.array(later["load_us"], dtype=np.uint64))
    out = dict(into)
    out["epoch"] = later["epoch"]
    out["epochs"] = into["epochs"] + later["epochs"]
    for key in ("batches", "wait_ns", "wall_ns", "busy_ns", "thread_ns"):
        out[key] = into[key] + later[key]
    out["load_us"] = into["load_us"] + later["load_us"]
    out["peak_in_flight"] = max(into["peak_in_flight"], later["peak_in_flight"])
    out["pool_buffers"] = later["pool_buffers"]
    out["pool_bytes"] = later["pool_bytes"]
    return out


def append(records: list[dict[str, Any]] | deque[dict[str, Any]], raw: dict[str, Any], joins: bool) -> None:
    """Appends an engine's record to ``records``, joined to the last one when ``joins`` (it
    continues that record's pass: restarted mid-epoch by autotune or after a ``TimeoutError``)."""
    if joins and records and raw["epochs"] == 1 and records[-1]["epochs"] == 1 and records[-1]["epoch"] == raw["epoch"]:
        joined = merge(records[-1], raw)
        joined["epochs"] = 1
        records[-1] = joined
    else:
        records.append(raw)


def with_threads(raw: dict[str, Any], threads: int) -> dict[str, Any]:
    """An engine's record with ``thread_ns``: the workers' wall time (the busy fraction's base)."""
    return dict(raw, thread_ns=raw["wall_ns"] * threads)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The dict :meth:`pyloader.Prefetcher.stats` shows for a record (see its docstring)."""
    wall_s = raw["wall_ns"] / 1e9
    wait_s = raw["wait_ns"] / 1e9
    out = {
        "epoch": raw["epoch"],
        "batches": raw["batches"],
        "load_ms_p50": percentile_us(raw["load_us"], 50) / 1000.0,
        "load_ms_p95": percentile_us(raw["load_us"], 95) / 1000.0,
        "wait_s": wait_s,
        "wall_s": wall_s,
        "stall_fraction": min(1.0, wait_s / wall_s) if wall_s > 0 else 0.0,
        "pool_buffers": raw["pool_buffers"],
        "pool_bytes": raw["pool_bytes"],
        "peak_in_flight": raw["peak_in_flight"],
        "worker_busy_fraction": min(1.0, raw["busy_ns"] / raw["thread_ns"]) if raw["thread_ns"] > 0 else 0.0,
    }
    if raw["epochs"] != 1:
        out["first_epoch"] = raw["first_epoch"]
        out["epochs"] = raw["epochs"]
    return out


class EpochRecords:
    """The records of the engines that have stopped: the last :data:`WINDOW` epochs, and the
    older ones merged into one."""

    def __init__(self) -> None:
        self.recent: deque[dict[str, Any]] = deque()
        self.earlier: dict[str, Any] | None = None
        self.engines = 0  # engines added so far: the running one is number `engines`
        # (engine number, epoch): that engine's record of that epoch continues the record before
        self.continued: set[tuple[int, int]] = set()

    def continues(self, epoch: int) -> None:
        """The pass of ``epoch`` goes on on the running engine, from where the last one stopped:
        the two engines' records of it are one."""
        self.continued.add((self.engines, epoch))
        if len(self.continued) > WINDOW:
            self.continued.discard(min(self.continued))

    def add(self, engine_stats: dict[str, Any], threads: int) -> None:
        """Takes in a stopped engine's ``stats()``, whose workers were ``threads``."""
        if engine_stats["earlier"] is not None:
            self.earlier = merge(self.earlier, with_threads(engine_stats["earlier"], threads))
        for raw in engine_stats["recent"]:
            append(self.recent, with_threads(raw, threads), (self.engines, raw["epoch"]) in self.continued)
        self.engines += 1
        while len(self.recent) > WINDOW:
            self.earlier = merge(self.earlier, self.recent.popleft())

    def view(self, live: dict[str, Any] | None, threads: int) -> dict[str, Any]:
        """What :meth:`pyloader.Prefetcher.stats` returns, with the running engine's ``live``
        stats (None: no engine) after the stopped ones'."""
        recent = list(self.recent)
        earlier = self.earlier
        if live is not None:
            if live["earlier"] is not None:  # the engine merged epochs: every older one goes too
                for raw in recent:
                    earlier = merge(earlier, raw)
                recent = []
                earlier = merge(earlier, with_threads(live["earlier"], threads))
            for raw in live["recent"]:
                append(recent, with_threads(raw, threads), (self.engines, raw["epoch"]) in self.continued)
        while len(recent) > WINDOW:
            earlier = merge(earlier, recent.pop(0))
        epochs = [summarize(raw) for raw in recent]
        return {
            "epochs": epochs,
            "current": epochs[-1] if epochs else None,
            "earlier": None if earlier is None else summarize(earlier),
        }

