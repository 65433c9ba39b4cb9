"""Sequences used across the tests: small, deterministic, instrumented."""

from __future__ import annotations

import threading
import time

import numpy as np


def batch_value(index: int) -> np.ndarray:
    return np.full((3, 5), index, dtype=np.int64)


class Counting:
    """Batch i is (array full of i, {"i": i}); records every index loaded, thread-safely."""

    def __init__(self, n: int, *, sleep: float = 0.0, fail: frozenset[int] = frozenset()) -> None:
        self.n = n
        self.sleep = sleep
        self.fail = fail
        self.loaded: list[int] = []
        self.epoch_ends = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.sleep:
            time.sleep(self.sleep)
        if i in self.fail:
            raise ValueError(f"bad batch {i}")
        with self._lock:
            self.loaded.append(i)
        return batch_value(i), {"i": i}


class WithEpochEnd(Counting):
    """Records the order of loads and on_epoch_end calls in one log."""

    def __init__(self, n: int, **kw) -> None:
        super().__init__(n, **kw)
        self.log: list[object] = []

    def __getitem__(self, i: int):
        out = super().__getitem__(i)
        with self._lock:
            self.log.append(i)
        return out

    def on_epoch_end(self) -> None:
        with self._lock:
            self.epoch_ends += 1
            self.log.append("end")


def indices_of(batches) -> list[int]:
    return [int(b[1]["i"]) for b in batches]
