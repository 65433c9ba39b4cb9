"""pyloader with no settings against Grain's read threads on one workload, interleaved in one
process (a busy spell of a shared machine falls on all alike): ``Prefetcher(seq)``,
``Prefetcher(seq, workers=2, depth=4 | 16, mode="thread")``, ``Prefetcher(seq, workers=3,
depth=6)`` and Grain's ``MapDataset.source(seq).to_iter_dataset(ReadOptions(num_threads=2))``,
ROUNDS times, 3 epochs each; the median batches/s of each.

Run: python bench/auto_vs_grain.py [WORKLOAD=decode] [ROUNDS=3]   (needs `pip install grain`)
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

import pyloader
from pyloader._bench._peers import grain_map
from pyloader._bench.workloads import build_workload

seq = build_workload(sys.argv[1] if len(sys.argv) > 1 else "decode")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
rates: dict[str, list[float]] = {}


def run(name: str, make: Callable[[], Any]) -> None:
    loader = make()
    for _ in range(3):
        t = time.perf_counter()
        n = sum(1 for _ in loader)
        rates.setdefault(name, []).append(n / (time.perf_counter() - t))
    if hasattr(loader, "close"):
        loader.close()


for _ in range(rounds):
    run("pyloader, no settings", lambda: pyloader.Prefetcher(seq))
    run("pyloader workers=2 depth=4", lambda: pyloader.Prefetcher(seq, workers=2, depth=4, mode="thread"))
    run("pyloader workers=2 depth=16", lambda: pyloader.Prefetcher(seq, workers=2, depth=16, mode="thread"))
    run("pyloader workers=3 depth=6", lambda: pyloader.Prefetcher(seq, workers=3, depth=6, mode="thread"))
    run("grain num_threads=2", lambda: grain_map(seq, 2, False))
for name, values in rates.items():
    print(f"{name:28s} {statistics.median(values):8.1f} batches/s")
