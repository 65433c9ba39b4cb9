"""Autotune against the setting it settles on, interleaved in one process: a fresh
``Prefetcher(seq)`` (every setting ``"auto"``) and a fresh ``Prefetcher(seq, workers=W,
depth=2 * W, mode="thread")``, one after the other, ROUNDS times, EPOCHS epochs each; the medians
of their batches/s over all epochs (the first included), and auto's over the hand-chosen one's.
A busy spell of a shared machine falls on both alike, which a bench run (one loader after the
other) cannot promise.

Run: python bench/auto_ab.py [WORKLOADS=tiny,large] [ROUNDS=10] [EPOCHS=4] [W=usable CPUs]
"""

from __future__ import annotations

import statistics
import sys
import time

import pyloader
from pyloader import _tune
from pyloader._bench.workloads import build_workload

workloads = (sys.argv[1] if len(sys.argv) > 1 else "tiny,large").split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 4
workers = int(sys.argv[4]) if len(sys.argv) > 4 else _tune.initial_workers(_tune.usable_cpus())

for name in workloads:
    seq = build_workload(name)
    rates: dict[str, list[float]] = {"auto": [], "hand": []}
    settings = set()
    for _ in range(rounds):
        for kind, options in (("auto", {}), ("hand", {"workers": workers, "depth": 2 * workers, "mode": "thread"})):
            with pyloader.Prefetcher(seq, **options) as loader:
                for _ in range(epochs):
                    t = time.perf_counter()
                    n = sum(1 for _ in loader)
                    rates[kind].append(n / (time.perf_counter() - t))
                if kind == "auto":
                    settings.add((loader.mode, loader.workers, loader.depth))
    auto, hand = statistics.median(rates["auto"]), statistics.median(rates["hand"])
    print(f"{name}: auto {auto:,.0f} batches/s, hand (threads, {workers}, depth {2 * workers}) {hand:,.0f}: "
          f"{auto / hand:.2f}x; auto ended with (mode, workers, depth) {sorted(settings)}")
