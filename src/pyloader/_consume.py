"""A stand-in for a training loop: it takes an epoch's batches and times how long it waited.

``python -m pyloader profile`` and the benchmark's measurements both need the same consumer: take
every batch, drop it, spend ``step_s`` seconds on the "training step", and count the seconds spent
inside ``next()`` (waiting for data: the stall) apart from the rest. Only the batch loop is here;
each caller adds what it measures around it (the wall time, starting the epoch).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, NamedTuple

__all__ = ["Consumed", "consume"]


class Consumed(NamedTuple):
    """What :func:`consume` saw of one epoch."""

    batches: int
    wait_s: float  # seconds spent inside next(), the last (StopIteration) call included
    first_s: float | None  # seconds from ``start`` until the first batch arrived; None: no batch


def consume(it: Iterator[Any], step_s: float, start: float) -> Consumed:
    """Takes every batch of ``it``, sleeping ``step_s`` seconds after each.

    Args:
        it: the epoch's batches.
        step_s: seconds of the simulated training step (``time.sleep``, which releases the GIL).
        start: a ``time.perf_counter()`` reading that ``first_s`` counts from.

    Returns:
        the batches taken, the seconds waited for them, and when the first one arrived.
    """
    perf = time.perf_counter
    wait = 0.0
    first = None
    n = 0
    while True:
        a = perf()
        try:
            batch = next(it)
        except StopIteration:
            wait += perf() - a
            break
        now = perf()
        wait += now - a
        if first is None:
            first = now - start
        n += 1
        del batch
        if step_s:
            time.sleep(step_s)
    return Consumed(n, wait, first)
