"""Window: what autotune measures between two decisions.

The Prefetcher decides (:mod:`pyloader._tune`) on a *window*: the batches the loop took since the
last decision, over one or more *segments*. A segment is a stretch of one pass on one engine: it
opens at ``iter()`` (or right after a decision restarted the engine mid-pass) and closes at the
pass's end or at a mid-pass checkpoint. A pass left unfinished, or an engine restarted under a
segment (a ``TimeoutError``, ``load_state_dict``), drops that segment: what it measured mixes two
engines or a loop that stopped asking. Short passes' segments are pooled until the window is long
enough to tell (:data:`pyloader._tune.MIN_EPOCH_S`, :data:`pyloader._tune.MIN_BATCHES`).

A segment's figures are the differences of the engine's own record of the epoch
(``_C.Engine.stats()``: kept by the consumer's calls, so they count only batches the loop took)
between its open and its close, plus this process's CPU time and the machine's idle CPU time
(``/proc/stat``) over the window. Nothing here decides or restarts anything.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from . import _tune
from ._stats import percentile_us

__all__ = ["Window"]

_SUMMED = ("batches", "wait_ns", "wall_ns", "busy_ns")


def _record(engine: Any, epoch: int) -> dict[str, Any] | None:
    """The engine's record of ``epoch`` now (None: the loop has not asked for one of its batches)."""
    for raw in engine.stats()["recent"]:
        if raw["epoch"] == epoch:
            return raw
    return None


class Window:
    """The segments measured since the last decision (see the module docstring)."""

    def __init__(self) -> None:
        # The open segment: (engine, epoch, its record then, perf_counter, process_time).
        self._mark: tuple[Any, int, dict[str, Any] | None, float, float] | None = None
        self._idle_start: tuple[int, int] | None = None  # the machine's idle ticks at the window's start
        self._reset()

    def _reset(self) -> None:
        self._sums = dict.fromkeys(_SUMMED, 0)
        self._thread_ns = 0  # the workers' wall time: the base of their busy share
        self._load_us: np.ndarray | None = None  # the load-time histogram
        self._clock_s = 0.0  # wall time of the closed segments, by this process's clock
        self._cpu_s = 0.0
        self._pool: tuple[int, int] = (0, 0)  # (buffers, bytes) of the pool at the latest close

    @property
    def pooled(self) -> bool:
        """Whether closed segments wait for more to be decided on (short passes pooled)."""
        return self._sums["batches"] > 0

    @property
    def open(self) -> bool:
        """Whether a segment is open."""
        return self._mark is not None

    def start(self, engine: Any, epoch: int) -> None:
        """Opens a segment of ``epoch`` on ``engine`` (an open one is dropped: its pass was left)."""
        if self._idle_start is None:
            self._idle_start = _tune.idle_jiffies()
        self._mark = (engine, epoch, _record(engine, epoch), time.perf_counter(), time.process_time())

    def drop(self) -> None:
        """Drops the open segment, unmeasured."""
        self._mark = None

    def elapsed_s(self) -> float:
        """Wall time of the window so far, the open segment's included."""
        mark = self._mark
        return self._clock_s + (time.perf_counter() - mark[3] if mark is not None else 0.0)

    def close(self, engine: Any, threads: int) -> None:
        """Closes the open segment, measured, if it is of ``engine`` (else drops it); ``threads``
        are the engine's worker threads."""
        mark, self._mark = self._mark, None
        if mark is None or mark[0] is not engine:
            return
        _, epoch, before, clock0, cpu0 = mark
        now = _record(engine, epoch)
        if now is None:
            return
        self._clock_s += time.perf_counter() - clock0
        self._cpu_s += time.process_time() - cpu0
        for key in _SUMMED:
            self._sums[key] += now[key] - (before[key] if before is not None else 0)
        wall_ns = now["wall_ns"] - (before["wall_ns"] if before is not None else 0)
        self._thread_ns += wall_ns * threads
        load = np.asarray(now["load_us"], dtype=np.int64)
        if before is not None:
            load = load - np.asarray(before["load_us"], dtype=np.int64)
        self._load_us = load if self._load_us is None else self._load_us + load
        self._pool = (now["pool_buffers"], now["pool_bytes"])

    def ready(self) -> bool:
        """Whether the closed segments are enough to decide on."""
        return (self._sums["batches"] >= _tune.MIN_BATCHES
                and self._sums["wall_ns"] / 1e9 >= _tune.MIN_EPOCH_S)

    def take(self, epoch: int, batch: int | None, gil_share: float | None,
             count_cpu: bool) -> _tune.Measurement:
        """The closed segments as one measurement, and a new window from now.

        Args:
            epoch: the epoch the window ends in.
            batch: the batch of that epoch it ends at, for a decision mid-pass (None: at its end).
            gil_share: what the GIL probe measured over the window (None: not measured).
            count_cpu: whether this process's CPU time is the loading's (not in process mode,
                whose workers are other processes).
        """
        sums, load = self._sums, self._load_us
        assert load is not None, "ready() first"
        counts = np.maximum(load, 0).astype(np.uint64)
        idle_start, idle_end = self._idle_start, _tune.idle_jiffies()
        idle_cpus = None
        if idle_start is not None and idle_end is not None and idle_end[1] > idle_start[1]:
            idle_cpus = (os.cpu_count() or 1) * (idle_end[0] - idle_start[0]) / (idle_end[1] - idle_start[1])
        buffers, nbytes = self._pool
        m = _tune.Measurement(
            epoch=epoch,
            batch=batch,
            batches=sums["batches"],
            wall_s=sums["wall_ns"] / 1e9,
            wait_s=sums["wait_ns"] / 1e9,
            load_p50_s=percentile_us(counts, 50) / 1e6,
            load_p95_s=percentile_us(counts, 95) / 1e6,
            busy_fraction=min(1.0, sums["busy_ns"] / self._thread_ns) if self._thread_ns > 0 else 0.0,
            gil_share=gil_share,
            cpu_used=self._cpu_s / self._clock_s if count_cpu and self._clock_s > 0 else None,
            batch_bytes=nbytes // buffers if buffers else 0,
            idle_cpus=idle_cpus,
        )
        self._reset()
        self._idle_start = idle_end
        return m

    def __repr__(self) -> str:
        return f"Window({self._sums['batches']} batches, {self._clock_s:.3f} s, open={self.open})"
