"""Sample Sequences for the CLI tests (``python -m pyloader profile tests/_sample_sequences.py:...``).

Small and fast on purpose: the tests check what the CLI prints and writes, never speed.
"""

from __future__ import annotations

import time

import numpy as np


class SleepySequence:
    """Batches that wait ``delay_s`` with the GIL released, then build two small arrays."""

    def __init__(self, batches: int = 16, delay_s: float = 0.002) -> None:
        self.batches = batches
        self.delay_s = delay_s

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.batches:
            raise IndexError(index)
        time.sleep(self.delay_s)
        return np.full((8, 4), index, dtype=np.float32), np.array([index], dtype=np.int64)


def make_sleepy() -> SleepySequence:
    """The factory the profile test names: ``_sample_sequences.py:make_sleepy``."""
    return SleepySequence()


class BusySequence(SleepySequence):
    """Batches computed in pure Python, which holds the GIL (about ``work_s`` each)."""

    def __init__(self, batches: int = 16, work_s: float = 0.004) -> None:
        super().__init__(batches, 0.0)
        self.work_s = work_s

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.batches:
            raise IndexError(index)
        end, total = time.thread_time() + self.work_s, 0
        while time.thread_time() < end:
            total += sum(range(200))
        return np.full((8, 4), index, dtype=np.float32), np.array([total], dtype=np.int64)


def make_busy() -> BusySequence:
    """A Sequence that holds the GIL: ``_sample_sequences.py:make_busy``."""
    return BusySequence()


def make_not_a_sequence() -> object:
    """A factory returning something that is not a Sequence (for the error path)."""
    return object()
