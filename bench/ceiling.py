"""What bounds a loader's speed on the per-sample decode workload, measured next to the loaders.

Both torch's DataLoader and pyloader are CPU-bound here (W workers on as many CPUs), so a loader
can beat torch only by spending less CPU per batch than torch does, and none can spend less than
the dataset's own work. This script runs, in one process, epochs of:

- plain:          one thread fetches and stacks every batch (no loader): the dataset's own CPU
                  per batch, one CPU alone;
- bare threads:   W Python threads taking batches from a shared counter, fetching and stacking,
                  handing nothing back (no loader);
- bare processes: W processes forked at the start of each epoch (as torch's and pyloader's
                  non-persistent workers are) taking batches from a shared counter, handing nothing
                  back, reaped at the end of the epoch: the dataset's work with W CPUs busy at once
                  plus the cost of forking per epoch, with no loader around it;
- the loaders:    torch DataLoader, pyloader.torch.DataLoader with threads and with processes,
                  with the same arguments (batch_size=32, shuffle, seeded generator, num_workers=W);
                  then both with persistent_workers=True.

Each row reports batches/s (median of its epochs), the ratio to torch, and the CPU time the whole
process tree spent per batch (this process plus the worker processes reaped during the epoch;
not measurable for persistent workers, which outlive their epochs). Epochs run round-robin over
the rows (one of each, then again), so a busy spell of the machine falls on all of them alike.

Run: python bench/ceiling.py [--workers 2] [--epochs 5] [--size 128] [--samples 3200]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
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


def load_shared(ds: SampleDecodeDataset, batches: list[list[int]], take) -> None:
    """Loads batches in the order ``take()`` hands out their numbers, until it runs out."""
    while (k := take()) < len(batches):
        load(ds, [batches[k]])


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped descendants (a reaped zygote brings the times
    of the workers it reaped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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
        take = itertools.count().__next__  # one C call: atomic under the GIL
        ts = [threading.Thread(target=load_shared, args=(ds, batches, take)) for _ in range(w)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    counter = multiprocessing.RawValue("q", 0)  # shared with the forked processes
    lock = multiprocessing.Lock()

    def take_shared() -> int:
        with lock:
            k = counter.value
            counter.value = k + 1
        return k

    def processes() -> None:
        counter.value = 0
        pids = []
        for _ in range(w):
            pid = os.fork()
            if pid == 0:
                try:
                    load_shared(ds, batches, take_shared)
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
        f"bare threads ({w}, no loader)": threads,
        f"bare processes ({w} forked per epoch, no loader)": processes,
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
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.epochs):
        for name, run in runs.items():
            c, t = cpu_seconds(), time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
            cpus[name].append(cpu_seconds() - c)
    rates = {name: len(batches) / statistics.median(ts) for name, ts in times.items()}
    torch_rate = rates["torch DataLoader"]
    print(f"samples-decode ({args.samples} samples of {args.size}x{args.size}, batches of 32), "
          f"{w} workers, {os.cpu_count()} CPUs, median of {args.epochs} epochs")
    for name, rate in rates.items():
        if "persistent" in name:  # its workers' CPU time is not known until they are reaped
            cpu = "      -"
        else:
            cpu = f"{statistics.median(cpus[name]) * 1000 / len(batches):7.2f}"
        print(f"  {name:<46} {rate:7.1f} batches/s  {rate / torch_rate:5.2f}x torch  {cpu} ms CPU/batch")


if __name__ == "__main__":
    main()
