"""Run the benchmark: every selected loader on every selected workload, one subprocess each.

The harness plans measurements (workload x loader x workers), runs each in a fresh subprocess
(:mod:`pyloader._bench._measure`), and meanwhile samples the memory of the subprocess and all its
descendants with psutil: PSS where the platform has it (shared pages, such as a dataset inherited
by forked workers, are split among the processes that map them instead of counted once per
process), RSS otherwise. Sampling starts when the subprocess reports that setup is done, so the
peak is that of the loading, and the baseline (the first sample after setup) is reported next to
it. Reading PSS is not free (the kernel walks each process's page tables: about 2 ms for a
process that imported torch), and the sampler runs on the same CPUs as the loaders it measures: on
a 2-CPU machine, sampling a 4-process tree every 50 ms took ~15% of one CPU and slowed the
multi-process loaders by 10-25%. So the period stretches to :data:`SAMPLER_DUTY` times the
duration of the last sample (at least ``sample_interval_s``), keeping the sampler under 5% of one
CPU. A subprocess that exceeds the timeout is killed with its children and recorded as an error.
``--quick`` runs all workloads of a loader in one subprocess instead (``group_by_loader``): it
saves the imports (Keras alone takes seconds), and its memory figures are only indicative.

The machine may be shared, and a busy spell falls on whichever loader runs then. ``rounds`` > 1
runs the whole plan that many times, in reverse order every other round, and pools each row's
epochs over its rounds: the noise then falls on every loader alike.

Loaders that cannot run are found out cheaply in this process (:func:`loaders.probe`) or by the
first subprocess that tries them, and skipped afterwards with the same note. The result is the
report document described in :mod:`pyloader._bench.report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable

from pyloader._bench import loaders as _loaders
from pyloader._bench import workloads as _workloads
from pyloader._bench.machine import machine_info
from pyloader._bench.report import SCHEMA_ID

__all__ = ["BenchConfig", "SAMPLER_DUTY", "run_bench"]

#: The memory sampler waits at least this many times as long as its last sample took.
SAMPLER_DUTY = 20


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        workloads: Workload names (keys of ``workloads.WORKLOADS``).
        loaders: Loader names (keys of ``loaders.LOADERS``).
        workers: Worker counts to measure each loader with.
        repeats: Epochs per measurement; results are medians over them.
        rounds: Runs of the whole plan (every other one in reverse order); each row pools the
            epochs of its rounds, its memory is that of its round with the highest peak.
        quick: Use the small smoke-test workloads.
        step_ms: Simulated training step per batch in the consumer, in milliseconds.
        timeout_s: Wall-clock limit of one measurement subprocess.
        sample_interval_s: Shortest period of the memory sampling (stretched to keep the sampler's
            CPU share under 1/:data:`SAMPLER_DUTY`).
        group_by_loader: Measure all workloads of a loader in one subprocess (saves the imports,
            used by ``--quick``) instead of one subprocess per measurement (honest memory).
    """

    workloads: tuple[str, ...]
    loaders: tuple[str, ...]
    workers: tuple[int, ...] = (4,)
    repeats: int = 3
    rounds: int = 1
    quick: bool = False
    step_ms: float = 0.0
    timeout_s: float = 600.0
    sample_interval_s: float = 0.05
    group_by_loader: bool = False

    def __post_init__(self) -> None:
        for name in self.workloads:
            if name not in _workloads.WORKLOADS:
                raise ValueError(
                    f"unknown workload {name!r}; choose from {', '.join(_workloads.WORKLOADS)}"
                )
        for name in self.loaders:
            if name not in _loaders.LOADERS:
                raise ValueError(
                    f"unknown loader {name!r}; choose from {', '.join(_loaders.LOADERS)}"
                )
        if not self.workloads:
            raise ValueError("workloads must name at least one workload, got an empty list")
        if not self.loaders:
            raise ValueError("loaders must name at least one loader, got an empty list")
        if not self.workers or any(int(w) < 1 for w in self.workers):
            raise ValueError(f"workers must be a non-empty list of ints >= 1, got {self.workers!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds!r}")
        if self.step_ms < 0:
            raise ValueError(f"step_ms must be >= 0, got {self.step_ms!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One subprocess: a loader at a worker count, on one workload (or several with quick)."""

    loader: str
    workers: int | None
    workloads: tuple[str, ...]


def _plan(config: BenchConfig) -> list[_Planned]:
    plan = []
    for loader in config.loaders:
        spec = _loaders.LOADERS[loader]
        names = tuple(w for w in config.workloads if spec.applies(w))
        if not names:
            continue
        for workers in config.workers if spec.uses_workers else [None]:
            if config.group_by_loader:
                plan.append(_Planned(loader, workers, names))
            else:
                plan.extend(_Planned(loader, workers, (w,)) for w in names)
    # Run every loader of a workload back to back (ratios appear together in the progress).
    order = {w: i for i, w in enumerate(config.workloads)}
    plan.sort(key=lambda p: order[p.workloads[0]])
    return plan


def _package_root() -> str:
    """Directory holding the ``pyloader`` package this process imported."""
    import pyloader._bench

    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        pyloader._bench.__file__))))


def _tree_memory(proc: Any) -> tuple[int, int, int, str]:
    """Sum memory over ``proc`` and its descendants: (pss_or_rss, rss, n_processes, metric)."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0, "pss"
    total = rss_total = count = 0
    metric = "pss"
    for p in procs:
        try:
            full = p.memory_full_info()
        except psutil.AccessDenied:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            rss_total += rss
            count += 1
            metric = "rss"
            continue
        except psutil.Error:
            continue
        pss = getattr(full, "pss", None)
        if pss is None:
            metric = "rss"
            pss = full.rss
        total += pss
        rss_total += full.rss
        count += 1
    return total, rss_total, count, metric


def _next_sample(started: float, config: BenchConfig) -> float:
    """When to sample next, after a sample that began at ``started`` and just ended."""
    took = time.monotonic() - started
    return started + max(config.sample_interval_s, SAMPLER_DUTY * took)


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.kill()


def _run_subprocess(
    request: dict[str, Any], config: BenchConfig, on_done: Callable[[str, dict[str, Any]], None]
) -> str | None:
    """Run one measurement subprocess; call ``on_done(workload, event)`` as workloads finish.

    Each final event (``result``, ``error`` or ``unavailable``) gets the memory figures sampled
    between the workload's ``ready`` event and its end. Workloads the subprocess never reached
    (it crashed or timed out) are reported as errors.

    Returns:
        The note if the loader itself was reported unavailable, else None.
    """
    import psutil

    env = dict(os.environ)
    root = _package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pyloader._bench._measure", json.dumps(request)]
    pending = list(request["workloads"])
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    loader_note: str | None = None
    failure: str | None = None
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    events.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
            events.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + config.timeout_s
        ready = False
        base = peak = peak_rss = peak_procs = 0
        metric = "pss"
        next_sample = 0.0
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                _kill_tree(proc)
                failure = f"timed out after {config.timeout_s:g} s (killed)"
                break
            wait = max(0.0, next_sample - now) if ready else config.sample_interval_s
            try:
                event = events.get(timeout=min(wait, remaining))
            except queue.Empty:
                event = {}
            if event is None:
                break
            kind = event.get("event")
            # Sample when the period is up, and always once more before a workload's result.
            if ready and (time.monotonic() >= next_sample or kind in ("result", "error", "unavailable")):
                started = time.monotonic()
                total, rss, count, m = _tree_memory(ps)
                next_sample = _next_sample(started, config)
                if count:
                    peak = max(peak, total)
                    peak_rss = max(peak_rss, rss)
                    peak_procs = max(peak_procs, count)
                    metric = m if m == "rss" else metric
            if kind == "ready":
                ready = True
                started = time.monotonic()
                base, peak_rss, peak_procs, metric = _tree_memory(ps)
                next_sample = _next_sample(started, config)
                peak = base
            elif kind in ("result", "error", "unavailable"):
                workload = event.get("workload")
                if workload is None:  # about the loader or the whole subprocess
                    if kind == "unavailable":
                        loader_note = event["note"]
                    else:
                        failure = event["error"]
                    continue
                if ready:
                    event["memory"] = {"metric": metric, "base_mb": base / 2**20,
                                       "peak_mb": peak / 2**20, "peak_rss_mb": peak_rss / 2**20,
                                       "peak_processes": peak_procs}
                ready = False
                if workload in pending:
                    pending.remove(workload)
                on_done(workload, event)
                deadline = time.monotonic() + config.timeout_s
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            proc.wait()
        reader.join(timeout=5)
        err.seek(0)
        stderr_tail = "\n".join(err.read().strip().splitlines()[-20:])
    for workload in pending:
        if loader_note is not None:
            on_done(workload, {"event": "unavailable", "note": loader_note})
        else:
            on_done(workload, {
                "event": "error", "stderr_tail": stderr_tail,
                "error": failure or f"measurement subprocess exited with status "
                                    f"{proc.returncode} before finishing {workload!r}"})
    return loader_note


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _summarize(
    workload: str, loader: str, workers: int | None, events: list[dict[str, Any]]
) -> dict[str, Any]:
    """Turn the subprocess events of one measurement (one per round) into one entry of the
    report's ``results``: the first that is not a result decides, else the rounds are pooled."""
    event = next((e for e in events if e["event"] != "result"), None)
    if event is None:
        event = _pool_rounds(events)
    row: dict[str, Any] = {
        "workload": workload,
        "loader": loader,
        "kind": _loaders.LOADERS[loader].kind,
        "workers": workers,
        "status": {"result": "ok", "unavailable": "unavailable"}.get(event["event"], "error"),
        "note": event.get("note") or event.get("error"),
        "batches": None,
        "batches_per_s": None,
        "first_batch_s": None,
        "cold_first_batch_s": None,
        "stall_fraction": None,
        "engine_stall_fraction": None,
        "startup_s": None,
        "close_s": None,
        "memory": event.get("memory"),
        "ratios": {},
        "epochs": [],
    }
    if row["status"] == "error":
        row["stderr_tail"] = event.get("stderr_tail", "")
        if event.get("traceback"):
            row["traceback"] = event["traceback"]
    if row["status"] != "ok":
        return row
    epochs = event["epochs"]
    row.update(
        batches=epochs[0]["batches"],
        batches_per_s=_median([e["batches"] / e["wall_s"] for e in epochs]),
        first_batch_s=_median([e["first_batch_s"] for e in epochs]),
        cold_first_batch_s=event["cold_first_batch_s"],
        stall_fraction=_median([e["stall_fraction"] for e in epochs]),
        engine_stall_fraction=_median(
            [(e.get("engine_stats") or {}).get("stall_fraction") for e in epochs]),
        startup_s=event["startup_s"],
        close_s=event["close_s"],
        epochs=epochs,
        self_rss_hwm_mb=event.get("self_rss_hwm_mb"),
        children_rss_hwm_mb=event.get("children_rss_hwm_mb"),
    )
    return row


def _pool_rounds(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One result event from the results of several rounds: their epochs in order (each tagged
    with its round), medians of the per-round figures, the memory of the round that peaked."""
    epochs = [dict(e, round=r) for r, event in enumerate(events) for e in event["epochs"]]
    with_memory = [e for e in events if e.get("memory")]
    hwm = {key: [e[key] for e in events if e.get(key) is not None]
           for key in ("self_rss_hwm_mb", "children_rss_hwm_mb")}
    return {
        "event": "result",
        "epochs": epochs,
        "startup_s": _median([e["startup_s"] for e in events]),
        "close_s": _median([e["close_s"] for e in events]),
        "cold_first_batch_s": _median([e["startup_s"] + e["epochs"][0]["first_batch_s"] for e in events]),
        "memory": max(with_memory, key=lambda e: e["memory"]["peak_mb"])["memory"] if with_memory else None,
        **{key: (max(values) if values else None) for key, values in hwm.items()},
    }


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """Fill ``ratios[peer] = batches_per_s / peer's batches_per_s`` within workload, workers and
    loader group (a ``model.fit`` epoch is compared only with other ``model.fit`` epochs)."""
    ok = [r for r in results if r["status"] == "ok"]
    group = {name: spec.group for name, spec in _loaders.LOADERS.items()}
    for row in ok:
        for peer in ok:
            if peer["kind"] != "peer" or peer["workload"] != row["workload"]:
                continue
            if group.get(peer["loader"]) != group.get(row["loader"]):
                continue
            if peer["workers"] is not None and peer["workers"] != row["workers"]:
                continue
            if peer["batches_per_s"]:
                row["ratios"][peer["loader"]] = row["batches_per_s"] / peer["batches_per_s"]


_ROUGH_ROW_S = 15.0  # seconds a row takes, all rounds' epochs and its process start included
_ROUGH_ROW_S_QUICK = 2.0


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _row_line(row: dict[str, Any], done: int, rows: int, pace: tuple[int, int, float]) -> str:
    """One finished row for the log: what it measured, and the time left at the pace so far
    (``pace``: measurements made, measurements planned, seconds spent)."""
    what = f"{row['workload']} / {row['loader']}" + (f" w{row['workers']}" if row["workers"] else "")
    if row["status"] == "ok":
        figure = f"{row['batches_per_s']:,.1f} batches/s"
    else:
        figure = f"{row['status']}: {row['note']}"
    measured, planned, elapsed_s = pace
    left = elapsed_s / max(measured, 1) * (planned - measured)
    return f"[{done}/{rows}] {what}: {figure} ({_minutes(elapsed_s)} so far, ~{_minutes(left)} left)"


def run_bench(
    config: BenchConfig,
    *,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every planned measurement and return the report document.

    Args:
        config: What to measure.
        progress: Show a tqdm progress bar on stderr (if tqdm is installed and stderr is a tty).
        on_result: Called with each result entry as soon as it is measured.
        log: Called with a line of text up front (what will run, and roughly how long) and one
            per finished row (its figure, and the time left at the pace so far): for output
            that is no terminal (CI logs, ``| tee``), where the progress bar does not show.

    Returns:
        The report document (schema in :mod:`pyloader._bench.report`).
    """
    plan = _plan(config)
    notes: list[str] = []
    skipped: dict[str, str] = {}
    for name in config.loaders:
        missing = _loaders.probe(_loaders.LOADERS[name].requires)
        if missing:
            skipped[name] = missing
    try:
        from tqdm import tqdm

        bar: Any = tqdm(total=config.rounds * sum(len(p.workloads) for p in plan), unit="run",
                        file=sys.stderr, disable=None if progress else True, dynamic_ncols=True)
    except ImportError:
        bar = None
    rows = sum(len(p.workloads) for p in plan)
    if log is not None:
        per_row = _ROUGH_ROW_S_QUICK if config.quick else _ROUGH_ROW_S
        log(f"bench: {rows} rows x {config.rounds} round(s), each loader in a fresh process; "
            f"roughly {_minutes(rows * config.rounds * per_row)} on a 2-CPU machine")
    results: list[dict[str, Any]] = []
    events: dict[tuple[str, str, int | None], list[dict[str, Any]]] = {}  # by row, one per round
    finished: set[tuple[str, str, int | None]] = set()  # rows in results (all rounds, or failed)
    measured = [0]  # measurements made (a row's rounds count one each)
    started = time.time()
    try:
        for round_ in range(config.rounds):
            last = round_ == config.rounds - 1
            for planned in plan if round_ % 2 == 0 else plan[::-1]:
                label = planned.loader + (f" w{planned.workers}" if planned.workers else "")
                if config.rounds > 1:
                    label += f", round {round_ + 1}/{config.rounds}"
                if bar is not None:
                    bar.set_description_str(f"{label} on {','.join(planned.workloads)}")

                def done(workload: str, event: dict[str, Any], planned: _Planned = planned,
                         last: bool = last) -> None:
                    key = (workload, planned.loader, planned.workers)
                    events.setdefault(key, []).append(event)
                    measured[0] += 1
                    if bar is not None:
                        bar.update(1)
                    if last or event["event"] != "result":  # its row is complete
                        row = _summarize(workload, planned.loader, planned.workers, events.pop(key))
                        results.append(row)
                        finished.add(key)
                        if on_result is not None:
                            on_result(row)
                        if log is not None:
                            pace = (measured[0], rows * config.rounds, time.time() - started)
                            log(_row_line(row, len(finished), rows, pace))

                todo = [w for w in planned.workloads if (w, planned.loader, planned.workers) not in finished]
                if bar is not None and len(todo) < len(planned.workloads):
                    bar.update(len(planned.workloads) - len(todo))  # failed in an earlier round
                if not todo:
                    continue
                if planned.loader in skipped:
                    for workload in todo:
                        done(workload, {"event": "unavailable", "note": skipped[planned.loader]})
                    continue
                request = {"loader": planned.loader, "workloads": todo,
                           "workers": planned.workers, "repeats": config.repeats,
                           "quick": config.quick, "step_ms": config.step_ms}
                note = _run_subprocess(request, config, done)
                if note is not None:
                    skipped[planned.loader] = note
    finally:
        if bar is not None:
            bar.close()
    w_order = {w: i for i, w in enumerate(config.workloads)}
    l_order = {name: i for i, name in enumerate(config.loaders)}
    results.sort(key=lambda r: (w_order[r["workload"]], l_order[r["loader"]], r["workers"] or 0))
    _add_ratios(results)
    for name, reason in skipped.items():
        notes.append(f"{name}: skipped, {reason}")
    for row in results:
        if row["status"] == "unavailable" and row["loader"] not in skipped:
            notes.append(f"{row['workload']}/{row['loader']}: skipped, {row['note']}")
        elif row["status"] == "error":
            notes.append(f"{row['workload']}/{row['loader']}: error: {row['note']}")
    return {
        "schema": SCHEMA_ID,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "command": list(sys.argv),
        "machine": machine_info(),
        "config": {
            "workloads": list(config.workloads),
            "loaders": list(config.loaders),
            "workers": list(config.workers),
            "repeats": config.repeats,
            "rounds": config.rounds,
            "quick": config.quick,
            "step_ms": config.step_ms,
            "timeout_s": config.timeout_s,
            "sample_interval_s": config.sample_interval_s,
            "group_by_loader": config.group_by_loader,
        },
        "workloads": {name: _workloads.WORKLOADS[name].description for name in config.workloads},
        "loaders": {name: _loaders.LOADERS[name].description for name in config.loaders},
        "notes": notes,
        "results": results,
    }
