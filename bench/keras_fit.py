"""Epoch time of a real ``model.fit``: Keras's own workers against ``pyloader.keras.prefetch``.

Usage::

    KERAS_BACKEND=torch python bench/keras_fit.py [--workloads latency,gather] [--repeats 5]
        [--epochs 4] [--workers 4] [--quick] [--json out.json]

Every measurement runs in a fresh interpreter (``--one``, internal): the model is a small
``Flatten -> Dense(1)``, ``fit`` runs with its defaults (``shuffle=True``), and the figure of one
run is the median of its epochs after the first (which builds the model and starts the workers).
Runs of the loaders are interleaved, ``--repeats`` times, and the table shows the median over the
repeats, its spread (min-max), and the ratio of the best Keras setting to pyloader (> 1: pyloader
is faster). Loaders: the user's PyDataset with ``workers=W`` threads (``keras-threads``), with
``use_multiprocessing=True`` (``keras-processes``), and through ``pyloader.keras.prefetch(workers=W)``.

Workloads (built from :mod:`pyloader._bench.workloads`, outside the timed region):

- ``latency``: 100 batches, each a 10 ms GIL-releasing wait (remote storage) + a 64x1024 float32.
- ``gather``: 100 batches of 256 random rows of 3x64x64 uint8 from a 200 MB in-memory array.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

WORKLOADS = {
    # name: (full size, --quick size)
    "latency": (
        "LatencySequence(batches=100, delay_s=0.010)",
        "LatencySequence(batches=24, delay_s=0.005)",
    ),
    "gather": (
        "GatherSequence(rows=16384, batch_size=256, batches=100)",
        "GatherSequence(rows=2048, batch_size=256, batches=24)",
    ),
}


def build(workload: str, quick: bool) -> Any:
    """The Sequence of ``workload`` (an expression over :mod:`pyloader._bench.workloads`)."""
    from pyloader._bench import workloads

    return eval(WORKLOADS[workload][quick], vars(workloads))  # noqa: S307 - our own table


def measure_one(workload: str, loader: str, *, workers: int, epochs: int, quick: bool) -> dict[str, Any]:
    """Epoch times of one ``fit`` in this process (and pyloader's stall fraction per epoch)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    from pyloader._bench.keras_fit import fit_epoch_times

    stats: list[dict[str, Any]] = []
    times = fit_epoch_times(build(workload, quick), loader=loader, workers=workers, epochs=epochs, stats=stats)
    return {"times": times, "stall": [round(e["stall_fraction"], 4) for e in stats]}


def run_one_subprocess(workload: str, loader: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", workload, loader,
           "--workers", str(args.workers), "--epochs", str(args.epochs)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "torch")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{loader} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="latency,gather")
    parser.add_argument("--loaders", default="keras-threads,keras-processes,pyloader")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", default=None, help="also write the raw epoch times here")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "LOADER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        result = measure_one(*args.one, workers=args.workers, epochs=args.epochs, quick=args.quick)
        print(json.dumps(result))
        return 0

    from pyloader._bench.machine import format_machine, machine_info

    workloads = args.workloads.split(",")
    loaders = args.loaders.split(",")
    raw: dict[str, dict[str, list[list[float]]]] = {w: {lo: [] for lo in loaders} for w in workloads}
    stalls: dict[str, list[float]] = {w: [] for w in workloads}
    for repeat in range(args.repeats):
        for workload in workloads:
            for loader in loaders:
                result = run_one_subprocess(workload, loader, args)
                times = result["times"]
                raw[workload][loader].append(times)
                stalls[workload] += result["stall"][1:]
                print(f"  repeat {repeat + 1}/{args.repeats} {workload:8s} {loader:16s} "
                      + " ".join(f"{t:.3f}" for t in times)
                      + (f"  stall {result['stall']}" if result["stall"] else ""), file=sys.stderr, flush=True)

    print(format_machine(machine_info()))
    print(f"model.fit epoch time (s), {args.workers} workers, {args.epochs} epochs per run, median of "
          f"epochs 2..{args.epochs} per run, median [min-max] over {args.repeats} runs"
          + (" (--quick sizes)" if args.quick else ""))
    summary: dict[str, dict[str, float]] = {}
    for workload in workloads:
        print(f"\n{workload}: {WORKLOADS[workload][args.quick]}")
        summary[workload] = {}
        for loader in loaders:
            per_run = [statistics.median(t[1:] or t) for t in raw[workload][loader]]
            med = statistics.median(per_run)
            summary[workload][loader] = med
            print(f"  {loader:16s} {med:8.3f}  [{min(per_run):.3f}-{max(per_run):.3f}]")
        keras_best = min((v for k, v in summary[workload].items() if k.startswith("keras")), default=None)
        if keras_best is not None and "pyloader" in summary[workload]:
            # Also per run: the loaders of one repeat ran back to back, under the same load.
            ratios = [
                min(statistics.median(raw[workload][k][r][1:] or raw[workload][k][r])
                    for k in loaders if k.startswith("keras"))
                / statistics.median(raw[workload]["pyloader"][r][1:] or raw[workload]["pyloader"][r])
                for r in range(args.repeats)
            ]
            print(f"  best Keras / pyloader = {keras_best / summary[workload]['pyloader']:.2f}x "
                  f"(per repeat: median {statistics.median(ratios):.2f}x, "
                  f"{' '.join(f'{x:.2f}' for x in ratios)})")
        if stalls[workload]:
            print(f"  pyloader stall fraction (epochs 2..): median {statistics.median(stalls[workload]):.3f}, "
                  f"max {max(stalls[workload]):.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine_info(), "args": vars(args), "epoch_times": raw,
                       "pyloader_stall": stalls, "median_s": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
