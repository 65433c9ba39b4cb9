"""Property tests: whatever the lengths, workers, depths, delays and failures, every batch arrives
exactly once per epoch, in plan order, with its own contents."""

from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyloader


class Random:
    def __init__(self, n, sleeps, failures):
        self.n, self.sleeps, self.failures = n, sleeps, failures
        self.lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.sleeps[i % len(self.sleeps)]:
            time.sleep(self.sleeps[i % len(self.sleeps)])
        if i in self.failures:
            raise RuntimeError(i)
        return {"i": np.full((i % 5 + 1,), i, dtype=np.int32), "n": i}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 40),
    workers=st.integers(1, 6),
    depth=st.integers(1, 9),
    shuffle=st.booleans(),
    sleeps=st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.002]), min_size=1, max_size=5),
    failures=st.sets(st.integers(0, 39), max_size=3),
    epochs=st.integers(1, 3),
)
def test_every_batch_exactly_once_in_order(n, workers, depth, shuffle, sleeps, failures, epochs):
    seq = Random(n, sleeps, failures)
    with pyloader.Prefetcher(seq, workers=workers, depth=depth, shuffle=shuffle, seed=1) as loader:
        for epoch in range(epochs):
            expected = loader._plan.indices(epoch).tolist()
            got = []
            it = iter(loader)
            while True:
                try:
                    b = next(it)
                except StopIteration:
                    break
                except pyloader.BatchError as e:
                    got.append(("failed", e.index))
                    break  # an error ends the pass; the next iter() starts the next epoch
                assert b["i"].tolist() == [b["n"]] * (b["n"] % 5 + 1)
                got.append(b["n"])
            # A pass ends at its first error: what it saw is a prefix of the plan.
            want = [("failed", i) if i in failures else i for i in expected]
            assert got == want[: len(got)]
            if not any(isinstance(g, tuple) for g in got):
                assert got == want

