"""``python -m pyloader profile MODULE:FACTORY``: measure a user's Sequence, recommend settings.

Four steps, each printed as it finishes:

1. **Load time.** Call ``seq[i]`` for the first ``batches`` batches in this thread and time each
   call (wall and thread CPU time): the distribution (p50/p95/max), the batch size in bytes, and
   the CPU share (CPU time / wall time: the rest is waiting, e.g. on storage or a sleep).
2. **GIL.** Load the same batches with pyloader's thread mode at each worker count and compare
   with one worker. Work that releases the GIL scales up to ``min(W, cpus / cpu_share)``; work
   that holds it does not scale at all. Amdahl's law on the observed speedup against that ideal
   gives an estimate of the share of ``__getitem__`` that holds the GIL; with the engine, the
   runs of two workers or more also sample the GIL as autotune does (:class:`pyloader._gil.
   GilProbe`: how often it is held while the loop waits), which a busy machine does not bend as
   it bends a speedup, and that sample is the share the recommendation uses.
3. **Recommendation.** ``mode``: when most of the time holds the GIL (threads cannot run it in
   parallel), process mode is measured at the same worker counts (step 2b) and recommended if
   it loaded faster than threads; else ``"thread"``. ``workers``: the fewest that reach 90% of the best
   throughput, or, with ``--step-ms``, that feed the training step with 10% to spare.
   ``depth``: twice the workers (the default), more when load times are uneven (p95/p50 > 2),
   so that a slow batch does not stall the ones behind it; capped by memory.
4. **Stall.** The consumer's data-stall fraction (``stats()``) at one worker, at the
   recommended workers with the default depth, and with the recommended depth, with a consumer
   that spends ``--step-ms`` per batch.

5. **Autotune.** ``Prefetcher(seq)`` with no settings (``workers``, ``depth`` and ``mode`` all
   ``"auto"``), :data:`AUTO_PASSES` passes over the same batches with the same step: the settings
   of each pass and every decision of the tuner (:mod:`pyloader._tune`, the one the Prefetcher
   runs), with why.

If the engine cannot be imported, step 2 falls back to an ordered thread pool (the GIL estimate
still holds) and step 4 times the consumer itself; the output says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TextIO

import numpy as np

from ._consume import consume
from ._gil import GilProbe

__all__ = ["load_target", "profile"]

AUTO_PASSES = 4  # passes of step 5, the autotuned Prefetcher


def load_target(target: str) -> Any:
    """Import ``MODULE:FACTORY`` and return the Sequence it names or makes.

    ``MODULE`` is a dotted module name (imported with the current directory on ``sys.path``, as
    ``python -m`` does) or a path to a ``.py`` file. ``FACTORY`` is a dotted attribute path to a
    callable returning a Sequence (called without arguments), or to a Sequence.

    Args:
        target: ``"module:factory"``.

    Returns:
        The Sequence (an object with ``__len__`` and ``__getitem__``).

    Raises:
        ValueError: If ``target`` is malformed, cannot be imported, or does not give a Sequence.
    """
    module_name, sep, attr_path = target.rpartition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mypkg.data:make_sequence), got {target!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise ValueError(f"no such file {module_name!r} in target {target!r}")
            name = "_pyloader_profile_target_" + os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            sys.path.insert(0, os.path.dirname(path))
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} from target {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr_path!r} "
                             f"(target {target!r})") from None
    if not _is_sequence(obj):
        if not callable(obj):
            raise ValueError(f"{target!r} is neither a Sequence nor a callable returning one, got "
                             f"{type(obj).__name__}")
        obj = obj()
    if not _is_sequence(obj):
        raise ValueError(f"{target!r} returned {type(obj).__name__}, not a Sequence (an object "
                         "with __len__ and __getitem__)")
    return obj


def _is_sequence(obj: Any) -> bool:
    return not isinstance(obj, type) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


class _Head:
    """The first ``n`` batches of a Sequence."""

    def __init__(self, seq: Any, n: int) -> None:
        self.seq = seq
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.seq[index]


def _nbytes(batch: Any) -> int:
    if isinstance(batch, np.ndarray):
        return int(batch.nbytes)
    if isinstance(batch, dict):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_nbytes(v) for v in batch)
    return int(getattr(batch, "nbytes", 0) or 0)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} GiB"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -- runners: one epoch over a Sequence, returning throughput and stall -----------------------


def _engine() -> Any:
    try:
        import pyloader

        return pyloader.Prefetcher
    except (ImportError, AttributeError):
        return None


def _run_pyloader(seq: Any, *, workers: int, depth: int | None, step_s: float,
                  mode: str = "thread", sample_gil: bool = False) -> dict[str, Any]:
    prefetcher = _engine()
    assert prefetcher is not None
    probe = GilProbe() if sample_gil else None
    with prefetcher(seq, workers=workers, depth=depth, mode=mode) as loader:
        if probe is not None:
            probe.waiting = True  # the loop does nothing but wait for batches (step_s aside)
        try:
            measured = _consume(iter(loader), step_s)
        finally:
            if probe is not None:
                probe.waiting = False
                measured_gil = probe.take()
                probe.close()
        stats = loader.stats()
    if probe is not None:
        measured["gil_held"] = measured_gil
    entry = next((e for e in stats.get("epochs", []) if e.get("epoch") == 0), stats.get("current"))
    if entry:
        measured["stall_fraction"] = entry.get("stall_fraction", measured["stall_fraction"])
        measured["load_ms_p50"] = entry.get("load_ms_p50")
        measured["load_ms_p95"] = entry.get("load_ms_p95")
        measured["worker_busy_fraction"] = entry.get("worker_busy_fraction")
    return measured


def _run_threadpool(seq: Any, *, workers: int, depth: int | None, step_s: float) -> dict[str, Any]:
    """Ordered loading with a Python thread pool, at most ``depth`` batches ahead."""
    depth = depth or 2 * workers

    def batches() -> Iterator[Any]:
        with ThreadPoolExecutor(workers) as pool:
            futures: list[Any] = []
            nxt = 0
            for i in range(len(seq)):
                while nxt < len(seq) and nxt < i + depth:
                    futures.append(pool.submit(seq.__getitem__, nxt))
                    nxt += 1
                yield futures[i].result()
                futures[i] = None

    return _consume(batches(), step_s)


def _consume(it: Iterator[Any], step_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    n, wait, _ = consume(it, step_s, t0)
    wall = time.perf_counter() - t0
    return {"batches": n, "wall_s": wall, "batches_per_s": n / wall if wall > 0 else math.inf,
            "stall_fraction": wait / wall if wall > 0 else 0.0}


# -- the profile --------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def _gil_share(speedup: float, ideal: float) -> float | None:
    """Amdahl: the serial (GIL-holding) share that turns ``ideal`` into the observed speedup."""
    if ideal < 1.2:
        return None
    share = (1 / max(speedup, 1e-9) - 1 / ideal) / (1 - 1 / ideal)
    return min(1.0, max(0.0, share))


def _process_mode_supported() -> bool:
    prefetcher = _engine()
    if prefetcher is None:
        return False
    try:
        prefetcher(_Head([np.zeros(1)], 1), workers=1, mode="process").close()
    except ValueError:
        return False
    return True


def profile(
    seq: Any,
    *,
    workers: list[int] | tuple[int, ...] = (1, 2, 4, 8),
    batches: int = 64,
    step_ms: float = 0.0,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Measure ``seq`` and recommend ``mode``, ``workers`` and ``depth``; print the reasoning.

    Args:
        seq: The Sequence.
        workers: Worker counts to try (1 is always added: it is the baseline).
        batches: Batches to load per setting (at most ``len(seq)``).
        step_ms: The training step per batch, for the stall measurement (0: a consumer that
            only loads).
        out: Where to print (default ``sys.stdout``); ``None`` output is still returned.

    Returns:
        A JSON-ready dict: ``load`` (serial timings), ``scaling`` (per worker count),
        ``gil_share``, ``recommendation`` (``mode``, ``workers``, ``depth``, ``reasons``) and
        ``stall`` (per setting).

    Raises:
        ValueError: If an option is out of range or the Sequence is empty.
    """
    out = sys.stdout if out is None else out
    worker_counts = sorted({1, *[int(w) for w in workers]})
    if worker_counts[0] < 1:
        raise ValueError(f"workers must be >= 1, got {list(workers)!r}")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches!r}")
    if step_ms < 0:
        raise ValueError(f"step_ms must be >= 0, got {step_ms!r}")
    total = len(seq)
    if total < 1:
        raise ValueError(f"the Sequence is empty (len {total!r}); nothing to profile")
    n = min(batches, total)
    head = _Head(seq, n)
    step_s = step_ms / 1e3
    cpus = _cpus()
    engine = _engine() is not None

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"profiling {type(seq).__name__} ({total} batches; using the first {n}) on {cpus} CPUs")
    if not engine:
        say("note: pyloader's engine is not importable; a Python thread pool stands in for it")

    # 1. serial load time -----------------------------------------------------------------------
    t = time.perf_counter()
    first = seq[0]
    first_s = time.perf_counter() - t
    batch_bytes = _nbytes(first)
    del first
    walls: list[float] = []
    cpus_used: list[float] = []
    for i in range(n):
        w0, c0 = time.perf_counter(), time.thread_time()
        batch = seq[i]
        cpus_used.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
        del batch
    wall_sum = sum(walls)
    cpu_share = min(1.0, sum(cpus_used) / wall_sum) if wall_sum > 0 else 1.0
    p50, p95 = _percentile(walls, 50), _percentile(walls, 95)
    load = {"batches": n, "first_call_ms": first_s * 1e3, "p50_ms": p50 * 1e3,
            "p95_ms": p95 * 1e3, "max_ms": max(walls) * 1e3,
            "mean_ms": statistics.fmean(walls) * 1e3, "cpu_share": cpu_share,
            "batch_bytes": batch_bytes}
    say()
    say("1. load time per batch (one thread, no loader)")
    say(f"   p50 {p50 * 1e3:.3g} ms, p95 {p95 * 1e3:.3g} ms, max {max(walls) * 1e3:.3g} ms "
        f"(first call {first_s * 1e3:.3g} ms); {_size(batch_bytes)} per batch")
    say(f"   CPU share {cpu_share:.0%} (the rest of the time the thread waits: I/O, sleep, locks)")

    # 2. thread scaling -> GIL share --------------------------------------------------------------
    run: Callable[..., dict[str, Any]] = _run_pyloader if engine else _run_threadpool
    scaling: list[dict[str, Any]] = []
    say()
    say("2. thread-mode throughput by workers (consumer does no work)")
    base_rate = None
    for w in worker_counts:
        r = run(head, workers=w, depth=None, step_s=0.0, **({"sample_gil": w > 1} if engine else {}))
        base_rate = base_rate or r["batches_per_s"]
        ideal = min(float(w), cpus / cpu_share) if cpu_share > 0 else float(w)
        entry = {"workers": w, "batches_per_s": r["batches_per_s"],
                 "speedup": r["batches_per_s"] / base_rate, "ideal_speedup": max(1.0, ideal),
                 "stall_fraction": r["stall_fraction"], "gil_held": r.get("gil_held")}
        scaling.append(entry)
        say(f"   workers={w:<3} {r['batches_per_s']:9.1f} batches/s  "
            f"speedup {entry['speedup']:.2f}x (GIL-free ideal {entry['ideal_speedup']:.2f}x)")
    thread_scaling = scaling
    informative = [s for s in scaling if s["ideal_speedup"] >= 1.2]
    gil: float | None = None
    sampled = [s["gil_held"] for s in scaling if s.get("gil_held") is not None and cpus > 1]
    if informative:
        top = max(informative, key=lambda s: s["batches_per_s"])
        gil = _gil_share(top["speedup"], top["ideal_speedup"])
        say(f"   => about {gil:.0%} of the load time holds the GIL (Amdahl on "
            f"{top['speedup']:.2f}x of an ideal {top['ideal_speedup']:.2f}x at "
            f"workers={top['workers']})")
    if sampled:
        gil = max(sampled)
        say(f"   => the GIL was held {gil:.0%} of the time the loop waited (sampled as autotune "
            f"does; the share used below)")
    elif not informative:
        say("   => GIL share not measurable here (one CPU, or one worker only)")

    # 2b. process mode, measured where the GIL share says it may help -----------------------------
    reasons: list[str] = []
    best = max(scaling, key=lambda s: s["batches_per_s"])
    process_ok = engine and _process_mode_supported()
    process_scaling: list[dict[str, Any]] = []
    mode = "thread"
    if gil is not None and gil >= 0.5 and cpus > 1 and process_ok:
        say()
        say("2b. process-mode throughput by workers (most of the load time holds the GIL)")
        for w in worker_counts:
            r = _run_pyloader(head, workers=w, depth=None, step_s=0.0, mode="process")
            process_scaling.append({"workers": w, "batches_per_s": r["batches_per_s"],
                                    "stall_fraction": r["stall_fraction"]})
            say(f"   workers={w:<3} {r['batches_per_s']:9.1f} batches/s")
        best_process = max(process_scaling, key=lambda s: s["batches_per_s"])
        if best_process["batches_per_s"] > best["batches_per_s"]:
            mode = "process"
            reasons.append(f"mode='process': about {gil:.0%} of __getitem__ holds the GIL, and "
                           f"processes measured {best_process['batches_per_s']:.1f} batches/s "
                           f"against threads' {best['batches_per_s']:.1f}")
            scaling, best = process_scaling, best_process
        else:
            reasons.append(f"mode='thread': about {gil:.0%} of __getitem__ holds the GIL, but "
                           f"processes measured only {best_process['batches_per_s']:.1f} "
                           f"batches/s against threads' {best['batches_per_s']:.1f} (the cost of "
                           "starting them, or of the batches' size)")

    # 3. recommendation ---------------------------------------------------------------------------
    if process_scaling:
        pass  # the mode was decided above, by measurement
    elif gil is not None and gil >= 0.5 and cpus > 1:  # and process mode is not available
        reasons.append(f"about {gil:.0%} of __getitem__ holds the GIL: mode='process' would "
                       "run it in parallel, but this pyloader does not support it yet, so "
                       "mode='thread' (fewer workers cost nothing here)")
    else:
        share = "unknown" if gil is None else f"about {gil:.0%}"
        reasons.append(f"mode='thread': {share} of the load time holds the GIL, threads load in "
                       "parallel without copying batches between processes")
    if step_s > 0:
        need = 1 / step_s
        enough = [s for s in scaling if s["batches_per_s"] >= 1.1 * need]
        if enough:
            pick = enough[0]
            reasons.append(f"workers={pick['workers']}: the fewest that feed a {step_ms:g} ms step "
                           f"({need:.1f} batches/s needed, {pick['batches_per_s']:.1f} measured)")
        else:
            pick = best
            reasons.append(f"workers={pick['workers']}: the fastest measured "
                           f"({pick['batches_per_s']:.1f} batches/s), still short of the "
                           f"{need:.1f} batches/s a {step_ms:g} ms step needs: expect stalls; "
                           "try more workers" + ("" if mode == "process" else " or process mode"))
    else:
        pick = next(s for s in scaling if s["batches_per_s"] >= 0.9 * best["batches_per_s"])
        reasons.append(f"workers={pick['workers']}: the fewest within 10% of the best throughput "
                       f"({pick['batches_per_s']:.1f} vs {best['batches_per_s']:.1f} batches/s at "
                       f"workers={best['workers']})")
    rec_workers = int(pick["workers"])
    jitter = p95 / p50 if p50 > 0 else 1.0
    depth = 2 * rec_workers
    if jitter > 2:
        depth = min(8 * rec_workers, math.ceil(rec_workers * jitter))
        why = (f"load times are uneven (p95/p50 = {jitter:.1f}): a deeper queue keeps the "
               "batches behind a slow one flowing")
    else:
        why = f"load times are even (p95/p50 = {jitter:.1f}): the default 2 x workers suffices"
    try:
        import psutil

        budget = psutil.virtual_memory().total // 8
    except ImportError:
        budget = 2 << 30
    if batch_bytes and depth * batch_bytes > budget:
        depth = max(rec_workers, int(budget // batch_bytes))
        why += f"; capped at {depth} so the buffers stay under 1/8 of RAM"
    reasons.append(f"depth={depth}: {why} ({depth} x {_size(batch_bytes)} in flight)")
    recommendation = {"mode": mode, "workers": rec_workers, "depth": depth, "reasons": reasons}
    say()
    say(f"3. recommendation: Prefetcher(seq, mode={mode!r}, workers={rec_workers}, depth={depth})")
    for reason in reasons:
        say(f"   - {reason}")

    # 4. stall at a few settings -------------------------------------------------------------------
    settings = list(dict.fromkeys([(1, 2), (rec_workers, 2 * rec_workers), (rec_workers, depth)]))
    stall = []
    say()
    say(f"4. consumer stall with a {step_ms:g} ms step per batch"
        + ("" if engine else " (timed by the profiler)"))
    for w, d in settings:
        r = run(head, workers=w, depth=d, step_s=step_s, **({"mode": mode} if engine else {}))
        stall.append({"workers": w, "depth": d,
                      "stall_fraction": r["stall_fraction"], "batches_per_s": r["batches_per_s"]})
        say(f"   workers={w:<3} depth={d:<4} stall "
            f"{r['stall_fraction']:6.1%}  {r['batches_per_s']:9.1f} batches/s")
    if step_s == 0:
        say("   (no --step-ms: the consumer only loads, so it always waits; pass your training "
            "step time to see the stall your loop will see)")

    # 5. autotune ----------------------------------------------------------------------------------
    autotune = _autotune(head, step_s, say) if engine else None
    return {"sequence": type(seq).__name__, "length": total, "cpus": cpus, "engine": engine,
            "load": load, "scaling": thread_scaling, "process_scaling": process_scaling,
            "gil_share": gil,
            "recommendation": recommendation, "stall": stall, "step_ms": step_ms,
            "autotune": autotune}


def _autotune(head: Any, step_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Step 5: the Prefetcher's own tuner over ``head``, :data:`AUTO_PASSES` passes."""
    from . import _tune

    prefetcher = _engine()
    assert prefetcher is not None
    say("")
    say(f"5. autotune: Prefetcher(seq) with no settings, {AUTO_PASSES} passes with a "
        f"{step_s * 1e3:g} ms step")
    passes = []
    with prefetcher(head) as loader:
        for index in range(AUTO_PASSES):
            it = iter(loader)  # applies the decisions taken on the pass before
            settings = {"mode": loader.mode, "workers": loader.workers, "depth": loader.depth}
            r = _consume(it, step_s)
            passes.append({**settings, "batches_per_s": r["batches_per_s"],
                           "stall_fraction": r["stall_fraction"]})
            say(f"   pass {index}: mode={settings['mode']:<7} workers={settings['workers']:<3} "
                f"depth={settings['depth']:<4} {r['batches_per_s']:9.1f} batches/s, stall "
                f"{r['stall_fraction']:6.1%}")
        decisions = list(loader.stats()["autotune"]["decisions"])
    for decision in decisions:
        say(f"   - {decision}")
    if not decisions:
        say(f"   - no change: the first settings fit, or passes shorter than {_tune.MIN_EPOCH_S:g} s "
            f"or {_tune.MIN_BATCHES} batches tell too little (raise --batches)")
    return {"passes": passes, "decisions": decisions}
