"""How fast can any loader go on the per-sample decode workload with W workers on this machine?

A loader can only beat torch's DataLoader by spending less CPU per batch than torch does. This
script measures the ceilings next to the loaders, in one run, each a median of epochs:

- plain:        one thread fetches and stacks every batch (no loader);
- W threads:    W Python threads, each fetching and stacking its share of batches (no hand-off):
                the most any thread-based loader can do with this dataset's GIL-holding share;
- W processes:  W processes forked at the start of each epoch (as torch's and pyloader's
                non-persistent workers are), each loading its share and handing nothing back: the
                most any loader with per-epoch worker processes can do;
- the loaders:  torch DataLoader, pyloader.torch.DataLoader with threads and with processes,
                with the same arguments (batch_size=32, shuffle, seeded generator, num_workers=W);
                then both with persistent_workers=True (to compare with each other: their workers
                are not forked per epoch, so the per-epoch ceiling does not bound them).

Epochs run round-robin over the rows (one of each, then again), so a busy spell of the machine
falls on all of them alike; each row is the median of its epochs.

Run: python bench/ceiling.py [--workers 2] [--epochs 5] [--size 128] [--samples 3200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np
import torch

import pyloader.torch as pt
from pyloader._bench.workloads import SampleDecodeDataset


def load(ds: SampleDecodeDataset, batches: list[list[int]]) -> None:
    for batch in batches:
        samples = [ds[i] for i in batch]
        np.stack([x for x, _ in samples])
        np.array([y for _, y in samples])


def shares(batches: list[list[int]], workers: int) -> list[list[list[int]]]:
    return [batches[k::workers] for k in range(workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=3200)
    args = parser.parse_args()
    ds = SampleDecodeDataset(samples=args.samples, size=args.size, images=64, sample_batch_size=32)
    order = np.random.default_rng(0).permutation(args.samples).tolist()
    batches = [order[k : k + 32] for k in range(0, args.samples, 32)]
    w = args.workers

    def plain() -> None:
        load(ds, batches)

    def threads() -> None:
        ts = [threading.Thread(target=load, args=(ds, share)) for share in shares(batches, w)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def processes() -> None:
        pids = []
        for share in shares(batches, w):
            pid = os.fork()
            if pid == 0:
                try:
                    load(ds, share)
                finally:
                    os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)

    def loader(dl):  # non-persistent workers start and end with each epoch; persistent ones stay
        def epoch() -> None:
            for _ in dl:
                pass

        return epoch

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    opts = dict(batch_size=32, shuffle=True, num_workers=w)
    runs = {
        "plain (1 thread, no loader)": plain,
        f"{w} threads, no loader (ceiling for threads)": threads,
        f"{w} processes forked per epoch, no loader (ceiling)": processes,
        "torch DataLoader": loader(torch.utils.data.DataLoader(ds, generator=seeded(), **opts)),
        "pyloader.torch threads": loader(pt.DataLoader(ds, generator=seeded(), **opts)),
        "pyloader.torch processes": loader(pt.DataLoader(ds, generator=seeded(), mode="process", **opts)),
        "torch DataLoader, persistent_workers": loader(
            torch.utils.data.DataLoader(ds, generator=seeded(), persistent_workers=True, **opts)),
        "pyloader.torch processes, persistent_workers": loader(
            pt.DataLoader(ds, generator=seeded(), mode="process", persistent_workers=True, **opts)),
    }
    # Round-robin epochs, so that the machine's noise (it is shared) falls on every row alike.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.epochs):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    rates = {name: len(batches) / statistics.median(ts) for name, ts in times.items()}
    torch_rate = rates["torch DataLoader"]
    print(f"samples-decode ({args.samples} samples of {args.size}x{args.size}, batches of 32), "
          f"{w} workers, {os.cpu_count()} CPUs, median of {args.epochs} epochs")
    for name, rate in rates.items():
        print(f"  {name:<52} {rate:7.1f} batches/s  {rate / torch_rate:5.2f}x torch")


if __name__ == "__main__":
    main()
