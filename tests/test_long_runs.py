"""Long runs: memory and stats() do not grow with the number of epochs or batches.

The engine drops the segments behind the consumer (NOTE [ Engine prunes segments behind the
consumer ], engine.h), keeps each epoch's load times in a fixed histogram, and both it and the
Prefetcher keep the latest epochs' records in detail and merge older ones into stats()["earlier"].
Sizes and counts are asserted, never times.
"""

from __future__ import annotations

import gc
import pickle

import numpy as np
import psutil
from sequences import Counting

import pyloader
from pyloader import _C
from pyloader._stats import WINDOW, percentile_us


def under_address_sanitizer() -> bool:
    """Whether AddressSanitizer's runtime is loaded (.ci/sanitized-tests preloads it)."""
    try:
        with open("/proc/self/maps") as maps:
            return "libasan" in maps.read()
    except OSError:
        return False


def run_epochs(loader: pyloader.Prefetcher, epochs: int) -> None:
    for _ in range(epochs):
        for _ in loader:
            pass


def test_many_tiny_epochs_keep_memory_segments_and_stats_bounded():
    seq = pyloader.ArraySequence(np.zeros((1, 1), np.float32), batch_size=1)
    proc = psutil.Process()
    with pyloader.Prefetcher(seq, workers=1, depth=2) as loader:
        run_epochs(loader, 2_000)
        gc.collect()
        before = proc.memory_info().rss
        run_epochs(loader, 20_000)
        gc.collect()
        grown = proc.memory_info().rss - before
        stats = loader.stats()
        assert loader._engine is not None
        segments = loader._engine.segments()
    # Under AddressSanitizer, freed memory stays resident in its quarantine (256 MiB by default):
    # RSS does not measure the loader there. The counts and sizes below still do.
    if not under_address_sanitizer():
        assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 20000 epochs"  # was 11 MiB
    assert len(segments) <= 3, segments
    assert len(stats["epochs"]) == WINDOW
    assert [e["epoch"] for e in stats["epochs"]] == list(range(22_000 - WINDOW, 22_000))
    earlier = stats["earlier"]
    assert (earlier["first_epoch"], earlier["epoch"], earlier["epochs"]) == (0, 22_000 - WINDOW - 1, 22_000 - WINDOW)
    assert earlier["batches"] + sum(e["batches"] for e in stats["epochs"]) == 22_000
    assert stats["current"] == stats["epochs"][-1]
    assert len(pickle.dumps(stats)) < 64 << 10


def test_one_long_epoch_keeps_a_fixed_size_load_time_record():
    seq = pyloader.ArraySequence(np.zeros((50_000, 1), np.float32), batch_size=1)
    with pyloader.Prefetcher(seq, workers=2) as loader:
        run_epochs(loader, 1)
        assert loader._engine is not None
        raw = loader._engine.stats()["recent"]
    assert len(raw) == 1
    assert raw[0]["load_us"].shape == (len(_C.LOAD_US_BUCKETS) - 1,)  # not one entry per batch
    assert int(raw[0]["load_us"].sum()) == raw[0]["batches"] == 50_000


def test_stats_of_many_engines_keep_a_window_and_count_every_batch():
    # set_epoch() starts a new engine each time: the Prefetcher's own records are windowed too.
    with pyloader.Prefetcher(Counting(3), workers=1) as loader:
        for epoch in range(3 * WINDOW):
            loader.set_epoch(epoch)
            run_epochs(loader, 1)
        stats = loader.stats()
    assert [e["epoch"] for e in stats["epochs"]] == list(range(2 * WINDOW, 3 * WINDOW))
    assert stats["earlier"]["epochs"] == 2 * WINDOW
    assert stats["earlier"]["batches"] + sum(e["batches"] for e in stats["epochs"]) == 3 * 3 * WINDOW


def test_load_time_percentiles_come_from_the_histogram_within_its_resolution():
    bounds = np.asarray(_C.LOAD_US_BUCKETS)
    values = np.array([3, 9, 15, 100, 1_000, 2_500, 40_000, 900_000], dtype=np.uint64)
    counts = np.zeros(len(bounds) - 1, np.uint64)
    np.add.at(counts, np.searchsorted(bounds, values, side="right") - 1, 1)
    for q in (0, 50, 95, 100):
        exact = float(values[int(q / 100 * (len(values) - 1))])
        got = percentile_us(counts, q)
        assert abs(got - exact) <= exact / 32, (q, got, exact)
    assert percentile_us(counts * 0, 50) == 0.0
    assert percentile_us(counts, 0) == 3.0  # exact below 16 us
