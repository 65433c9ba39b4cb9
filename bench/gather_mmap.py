"""The gather workload from a memory-mapped .npy in the page cache: plain loop vs ArraySequence.

Run: python bench/gather_mmap.py (writes a ~500 MB /tmp/gather_x.npy once).
"""
import os
import statistics
import time

import numpy as np

import pyloader

N = 40000
path = "/tmp/gather_x.npy"
if not os.path.exists(path):
    np.save(path, np.random.default_rng(0).integers(0, 255, size=(N, 3, 64, 64), dtype=np.uint8))
x = np.load(path, mmap_mode="r")
x[:].sum()  # page cache warm
ds = pyloader.ArraySequence.from_npy(path, batch_size=256, shuffle=True, seed=0)
bpb = 256 * x[0].nbytes
def plain():
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t)
def pre(w):
    with pyloader.Prefetcher(ds, workers=w) as L:
        t = time.perf_counter()
        n = sum(1 for _ in L)
        return n / (time.perf_counter() - t)
p = statistics.median([plain() for _ in range(5)])
for w in (2, 4):
    r = statistics.median([pre(w) for _ in range(5)])
    print(f"memmap .npy (page cache): plain {p:.0f} b/s, ArraySequence in Prefetcher(workers={w}) "
          f"{r:.0f} b/s = {r / p:.2f}x, {r * bpb / 1e9:.1f} GB/s")
