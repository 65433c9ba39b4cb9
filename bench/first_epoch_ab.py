"""The first epoch against the later ones: a fresh Prefetcher over an ArraySequence of 117
batches of 3 MiB, with the pool faulted in ahead (now) and without (before: the prefault thread
replaced by nothing), interleaved in one process. Medians over N fresh Prefetchers each.

Run: python bench/first_epoch_ab.py [N=20] [GAP_S=0.0]
GAP_S: seconds between making the Prefetcher and its first iter() (the rest of a set-up).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import pyloader
import pyloader.prefetcher as pf

real = pf._start_prefault
n_runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
gap = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
x = np.random.default_rng(0).random((117 * 8, 3 * 1024 * 1024 // 8 // 8))  # 8 rows: 3 MiB a batch
seq = pyloader.ArraySequence(x, batch_size=8)
res: dict[str, dict[str, list[float]]] = {k: {"first": [], "later": []} for k in ("before", "after")}
for _ in range(n_runs):
    for k in ("before", "after"):
        pf._start_prefault = real if k == "after" else (lambda *a: None)
        with pyloader.Prefetcher(seq) as p:
            time.sleep(gap)  # the rest of the set-up (a model built, a checkpoint read)
            for e in range(3):
                t = time.perf_counter()
                n = 0
                for b in p:
                    n += 1
                    del b
                res[k]["first" if e == 0 else "later"].append(n / (time.perf_counter() - t))
for k, r in res.items():
    f, later = statistics.median(r["first"]), statistics.median(r["later"])
    print(f"{k:6}: first epoch {f:5.0f} batches/s, later epochs {later:5.0f}, first/later {f / later:.2f}")
