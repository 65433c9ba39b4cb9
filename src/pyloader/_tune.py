"""Autotune policy: from what one window of batches measured, the next mode, workers and depth.

Pure: :func:`decide` maps ``(settings, measurement, limits, floor)`` to a :class:`Decision` (the
next settings and, for each change, a sentence saying why), with no clock, thread or I/O, so that
it is tested on simulated figures. :class:`Tuner` keeps what the policy needs across windows (the
fewest workers that were seen to keep up, the decisions made so far). :func:`usable_cpus` reads
the CPUs this process may use (affinity and the cgroup's CPU quota, v2 or v1); the Prefetcher and
``python -m pyloader profile`` measure, this module only decides.

The rules, applied to a window (:mod:`pyloader._window`: the batches since the last decision,
mid-pass or at an epoch's end) with enough batches and wall time to tell (:data:`MIN_BATCHES`,
:data:`MIN_EPOCH_S`):

1. **Loading is the bottleneck** (the loop waited at least :data:`STALL_HIGH` of the window):
   - in thread mode, when the GIL was held at least :data:`GIL_SWITCH` of the time the loop
     waited and at least 2 CPUs are usable, more threads cannot load faster: switch to worker
     processes (one per usable CPU), if the window is long enough to pay for starting them
     (:data:`MIN_SWITCH_S`);
   - else add workers, toward the count that would feed the loop's step with 20% to spare, at
     most doubling per decision (:data:`LIGHT_GROWTH` times for a load that waits): for a load
     that waits (each busy worker used less than :data:`LIGHT_CPU_SHARE` of a CPU: I/O, sleeps)
     whatever the CPUs do, up to 16 threads
     per CPU; for one that computes, up to one worker per usable CPU and only while CPUs are
     idle (the process used less than ``cpus - 0.5`` and the machine had half a CPU idle);
   - in thread mode, for a load that computes with no CPU to spare and more busy workers than
     CPUs, drop to one worker per CPU (never below the floor).
2. **The workers are not the bottleneck**: they were mostly idle (busy less than
   :data:`BUSY_LOW`), whether the loop hardly waited (the consumer is the bottleneck) or waited
   on something else (the hand-off, the pool): drop workers to keep the rest about 70% busy, never back to a count
   that stalled (the floor: one more than the most workers seen to stall), so that the tuner
   does not oscillate.
3. **Depth** follows the load-time spread: ``max(2 * workers, ceil(workers * p95 / p50))``, at
   most ``4 * workers``, and no more buffers of the batch's size than ``max_pool_bytes`` holds.
   It grows only by a third or more at a time (or with the workers), and only for busy workers,
   and shrinks only with the workers or for memory: each change restarts the engine, which loads
   the positions it had loaded ahead again.

Only the settings the user left ``"auto"`` change; an explicit number is always obeyed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Decision",
    "Limits",
    "Measurement",
    "Settings",
    "Tuner",
    "cgroup_quotas",
    "cpus_from",
    "decide",
    "initial_depth",
    "idle_jiffies",
    "initial_workers",
    "usable_cpus",
]

MIN_BATCHES = 16  # a window of fewer batches tells too little to act on
MIN_EPOCH_S = 0.25  # ... or shorter than this (a restart would cost more than it could save)
MID_PASS_S = 0.5  # a window decided on mid-pass lasts at least this (a restart reloads a few batches)
MIN_SWITCH_S = 0.5  # thread -> process only for windows long enough to pay for starting processes
STALL_HIGH = 0.05  # the loop waited at least this share of the window: loading is the bottleneck
STALL_LOW = 0.01  # at most this: the consumer is
GIL_SWITCH = 0.7  # the GIL held this share of the waits: threads are capped by it
GIL_QUIET = 0.3  # the GIL held less than this share of the waits: the load releases it
QUIET_WINDOWS = 2  # windows in a row that quiet, and the GIL is no longer sampled (threads stay)
BUSY_LOW = 0.5  # workers busy less than this share of the window are too many
BUSY_TARGET = 0.7  # dropping workers aims at this busy share
LIGHT_GROWTH = 4  # a load that waits may get up to this many times its workers per decision
LIGHT_CPU_SHARE = 0.1  # busy workers using less CPU than this share of their time mostly wait
MAX_THREAD_WORKERS = 64  # most threads auto starts
THREADS_PER_CPU = 16  # threads auto may add per usable CPU (for waits: I/O, sleeps; a waiting thread is cheap)
DEPTH_PER_WORKER = 4  # most depth per worker the spread rule asks for
HELD_BATCHES = 2  # buffers kept for batches the consumer holds, when memory bounds the depth


@dataclass(frozen=True)
class Settings:
    """What the loader runs with: ``mode`` (``"thread"`` or ``"process"``), ``workers``, ``depth``."""

    mode: str
    workers: int
    depth: int


@dataclass(frozen=True)
class Limits:
    """What bounds the decisions.

    Attributes:
        cpus: CPUs this process may use (:func:`usable_cpus`; a quota may make it fractional).
        max_pool_bytes: the buffer pool's bound.
        auto_mode, auto_workers, auto_depth: which settings the user left ``"auto"``.
        process_ok: whether process mode applies (not for an ``ArraySequence``, gathered natively).
    """

    cpus: float
    max_pool_bytes: int
    auto_mode: bool = True
    auto_workers: bool = True
    auto_depth: bool = True
    process_ok: bool = True

    @property
    def cpu_count(self) -> int:
        """Whole CPUs: at least 1."""
        return max(1, math.floor(self.cpus))

    def max_workers(self, mode: str) -> int:
        """The most workers auto uses: one per CPU for processes, up to 16 per CPU (64 in all) for threads."""
        if mode == "process":
            return self.cpu_count
        return min(MAX_THREAD_WORKERS, THREADS_PER_CPU * self.cpu_count)


@dataclass(frozen=True)
class Measurement:
    """One window's figures (:class:`pyloader._window.Window`: the engine's records and the loop's clock).

    Attributes:
        epoch: the epoch measured (the one the measurement ends in).
        batches: batches the loop took.
        wall_s: the wall time they took (first request to last batch).
        wait_s: time the loop waited for batches.
        load_p50_s, load_p95_s: per-batch load time percentiles.
        busy_fraction: the workers' busy share of their wall time.
        gil_share: share of the loop's waits during which the GIL was held (None: not measured).
        cpu_used: CPUs the process used on average over the window (None: not measured).
        idle_cpus: CPUs of the machine idle on average over the window, whoever else runs there
            (None: not measured).
        batch_bytes: bytes of buffer one batch takes (0: unknown).
        batch: for a measurement that ends mid-pass, the batch of ``epoch`` it ends at (None: it
            ends with the epoch).
    """

    epoch: int
    batches: int
    wall_s: float
    wait_s: float
    load_p50_s: float
    load_p95_s: float
    busy_fraction: float
    gil_share: float | None = None
    cpu_used: float | None = None
    batch_bytes: int = 0
    idle_cpus: float | None = None
    batch: int | None = None

    @property
    def where(self) -> str:
        """Where the measurement ends, for the reasons: ``"epoch 2"`` (at its end) or
        ``"epoch 2, batch 160"`` (mid-pass)."""
        return f"epoch {self.epoch}" if self.batch is None else f"epoch {self.epoch}, batch {self.batch}"

    @property
    def stall(self) -> float:
        """The loop's wait as a share of the window."""
        return min(1.0, self.wait_s / self.wall_s) if self.wall_s > 0 else 0.0

    @property
    def step_s(self) -> float:
        """The loop's own time per batch (its step), outside the waits."""
        return max(0.0, self.wall_s - self.wait_s) / self.batches if self.batches else 0.0


@dataclass(frozen=True)
class Decision:
    """The next settings, the floor of workers from now on, and why each change."""

    settings: Settings
    floor: int
    reasons: tuple[str, ...] = ()


def initial_workers(cpus: float) -> int:
    """Workers auto starts with: one per usable CPU (never more busy workers than CPUs), at most
    8. A load that computes is then where it should be; one that waits (I/O, sleeps) gets more
    within its first pass, from the first window's figures."""
    return min(8, max(1, math.floor(cpus)))


def initial_depth(workers: int) -> int:
    """Depth auto starts with: two batches per worker."""
    return 2 * workers


def _fewer(e: str, workers: int, floor: int, busy: float, reasons: list[str], why: str) -> int:
    """The workers that load what ``workers`` loaded ``busy`` of the time at ``BUSY_TARGET`` (at
    least ``floor``), with ``why`` among the reasons when that is fewer."""
    new = max(1, floor, math.ceil(workers * busy / BUSY_TARGET))
    if new >= workers:
        return workers
    reasons.append(f"{e}: workers {workers} -> {new}: {why}")
    return new


def decide(current: Settings, m: Measurement, limits: Limits, floor: int = 1) -> Decision:
    """The settings after the window ``m``. See the module docstring for the rules.

    Args:
        current: the settings the window ran with.
        m: what it measured.
        limits: the machine's and the user's bounds.
        floor: workers never drop below it (one more than the most workers seen to stall).

    Returns:
        The decision; ``settings == current`` and no reasons when nothing changes.
    """
    if m.batches < MIN_BATCHES or m.wall_s < MIN_EPOCH_S:
        return Decision(current, floor)
    mode, workers, depth = current.mode, current.workers, current.depth
    reasons: list[str] = []
    e = m.where
    stall, busy = m.stall, m.busy_fraction
    if stall >= STALL_HIGH:
        gil = m.gil_share
        if (limits.auto_mode and mode == "thread" and limits.process_ok and gil is not None
                and gil >= GIL_SWITCH and limits.cpu_count >= 2 and m.wall_s >= MIN_SWITCH_S):
            mode = "process"
            floor = 1
            if limits.auto_workers:
                workers = limits.max_workers("process")
            reasons.append(
                f"{e}: thread -> process: the GIL was held {gil:.0%} of the time the loop "
                f"waited for a batch ({stall:.0%} of the time), so more threads cannot load "
                f"faster; {workers} worker processes"
            )
        elif limits.auto_workers:
            cap = limits.max_workers(mode)
            rate = m.batches / m.wall_s
            need = 1.0 / m.step_s if m.step_s > 0 else math.inf
            # A load that waits (I/O, sleeps: each busy worker used little CPU) may run more
            # threads than CPUs, busy machine or not, and grows faster (a waiting thread is
            # cheap); one that computes, only up to one per CPU and while CPUs are idle, its own
            # and the machine's.
            light = (m.cpu_used is not None and busy > 0
                     and m.cpu_used / (workers * busy) < LIGHT_CPU_SHARE)
            growth = LIGHT_GROWTH if light else 2
            want = growth * workers if math.isinf(need) else math.ceil(workers * 1.2 * need / rate)
            want = max(workers + 1, min(want, growth * workers))
            idle = ((m.cpu_used is None or m.cpu_used < limits.cpus - 0.5)
                    and (m.idle_cpus is None or m.idle_cpus >= 0.5))
            can_add = light or (idle and (mode == "process" or workers < limits.cpu_count))
            saturated = mode == "thread" and not light and not idle
            if busy < BUSY_LOW:
                # The workers are not what the loop waits for (the hand-off, the GIL, the pool):
                # more would wait too, fewer load as much.
                workers = _fewer(e, workers, floor, busy, reasons,
                                 f"the loop waited {stall:.0%} of the time but the workers were only "
                                 f"{busy:.0%} busy: fewer load as much")
            elif saturated and workers > max(floor, limits.cpu_count):
                new = max(floor, limits.cpu_count)
                machine = "" if m.idle_cpus is None else f", {m.idle_cpus:.1f} idle on the machine"
                reasons.append(
                    f"{e}: workers {workers} -> {new}: no CPU to spare (this process used "
                    f"{m.cpu_used:.1f} of the {limits.cpus:g} it may use{machine}) and the workers "
                    f"were {busy:.0%} busy: more busy workers than CPUs only take turns"
                )
                workers = new
            elif not can_add:
                pass  # the CPUs are busy: another worker would only share them
            elif min(want, cap) > workers:
                new = min(want, cap)
                used = "" if m.cpu_used is None else f", {m.cpu_used:.1f} of {limits.cpus:g} CPUs used"
                reasons.append(
                    f"{e}: workers {workers} -> {new}: the loop waited {stall:.0%} of the "
                    f"time with the workers {busy:.0%} busy{used}"
                )
                floor = max(floor, workers + 1)  # fewer stalled: never drop back to them
                workers = new
    elif stall < STALL_LOW and limits.auto_workers and workers > 1 and busy < BUSY_LOW:
        workers = _fewer(e, workers, floor, busy, reasons,
                         f"the loop waited only {stall:.1%} of the time and the workers were "
                         f"{busy:.0%} busy: the consumer is the bottleneck")
    if mode == "process" and limits.auto_workers and workers > limits.cpu_count:
        reasons.append(f"{e}: workers {workers} -> {limits.cpu_count}: no more worker "
                       f"processes than the {limits.cpus:g} CPUs this process may use")
        workers = limits.cpu_count
    if limits.auto_depth:
        new_depth, why = _depth(workers, m, limits)
        # A restart for a small change of depth costs more than it brings: not below a third.
        # Deeper only helps busy workers (uneven loads); idle ones are not what the loop waits for.
        # It shrinks only with the workers or for memory: a noisy spread must not make it swing.
        grow = 3 * new_depth >= 4 * depth and busy >= BUSY_LOW
        capped = "max_pool_bytes" in why and new_depth < depth
        if new_depth != depth and (workers != current.workers or capped or grow):
            reasons.append(f"{e}: depth {depth} -> {new_depth}: {why}")
            depth = new_depth
    return Decision(Settings(mode, workers, depth), floor, tuple(reasons))


def _depth(workers: int, m: Measurement, limits: Limits) -> tuple[int, str]:
    """Depth for ``workers`` from the load-time spread, within the pool's bound."""
    spread = m.load_p95_s / m.load_p50_s if m.load_p50_s > 0 else 1.0
    want = max(2 * workers, min(DEPTH_PER_WORKER * workers, math.ceil(workers * spread)))
    why = f"load times p95/p50 = {spread:.1f} with {workers} workers"
    if m.batch_bytes > 0:
        fits = max(1, limits.max_pool_bytes // m.batch_bytes - HELD_BATCHES)
        if want > fits:
            return fits, why + f"; capped by max_pool_bytes ({fits} batches of {m.batch_bytes} bytes)"
    return want, why


class Tuner:
    """The policy's state across windows: the settings, the floor and every decision made.

    Args:
        settings: the settings the first epoch runs with.
        limits: the bounds (fixed for the loader's life).
    """

    def __init__(self, settings: Settings, limits: Limits) -> None:
        self.settings = settings
        self.limits = limits
        self.floor = 1
        self.decisions: list[str] = []
        # Whether the GIL is still worth sampling (the mode may still move to processes): not
        # after QUIET_WINDOWS windows in a row in which it was seldom held (the sampling thread
        # costs the loop a few percent on the cheapest loads).
        self.sample_gil = limits.auto_mode and limits.process_ok and settings.mode == "thread"
        self._quiet = 0
        self.measured: set[tuple[int, int | None]] = set()  # windows decided on: (epoch, batch)

    def observe(self, m: Measurement) -> Settings:
        """Takes one window's figures (once per window) and returns the settings from now on."""
        if (m.epoch, m.batch) in self.measured:
            return self.settings
        self.measured.add((m.epoch, m.batch))
        d = decide(self.settings, m, self.limits, self.floor)
        self.settings, self.floor = d.settings, d.floor
        self.decisions.extend(d.reasons)
        if self.settings.mode != "thread" or not self.limits.process_ok:
            self.sample_gil = False
        elif self.sample_gil and m.gil_share is not None:
            self._quiet = self._quiet + 1 if m.gil_share < GIL_QUIET else 0
            if self._quiet >= QUIET_WINDOWS:
                self.sample_gil = False
                self.decisions.append(
                    f"{m.where}: threads stay: the GIL was held under {GIL_QUIET:.0%} of the loop's "
                    f"waits in {QUIET_WINDOWS} windows in a row (it is no longer sampled)")
        return self.settings

    def __repr__(self) -> str:
        return f"Tuner({self.settings}, floor={self.floor}, {len(self.decisions)} decisions)"


def cpus_from(affinity: int, cpu_max: list[str]) -> float:
    """CPUs usable under ``affinity`` CPUs and the ``cpu.max`` texts (:func:`cgroup_quotas`) of the
    process's cgroup and its ancestors (``"max 100000"``: no quota; ``"150000 100000"``: 1.5 CPUs).

    Args:
        affinity: CPUs in the process's affinity mask.
        cpu_max: the contents of each ``cpu.max`` on the way to the root (any order).

    Returns:
        The smaller of the affinity and the tightest quota, at least 1 (a quota below one CPU
        still runs one worker).
    """
    cpus = float(max(1, affinity))
    for text in cpu_max:
        parts = text.split()
        if len(parts) != 2 or parts[0] == "max":
            continue
        try:
            quota, period = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        if quota > 0 and period > 0:
            cpus = min(cpus, quota / period)
    return max(1.0, cpus)


def idle_jiffies() -> tuple[int, int] | None:
    """``(idle, total)`` CPU time of the whole machine so far, in clock ticks (``/proc/stat``), or
    None where there is none. Two readings give the CPUs idle in between:
    ``cpus * d_idle / d_total``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    return ticks[3] + (ticks[4] if len(ticks) > 4 else 0), sum(ticks[:8])


def cgroup_quotas(cgroup: str, mountinfo: str, read: Callable[[str], str | None]) -> list[str]:
    """The CPU quotas of a process's cgroup and its ancestors, as ``cpu.max`` texts (``"quota
    period"``, ``"max period"`` for none), under cgroup v2 and v1 (``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``, ``-1`` for none) alike, as a container runtime sets either.

    Args:
        cgroup: the text of ``/proc/<pid>/cgroup`` (``id:controllers:path`` lines).
        mountinfo: the text of ``/proc/<pid>/mountinfo`` (where each hierarchy is mounted, and
            which of its directories the mount shows: a container sees its own cgroup as the root).
        read: reads a file's text, or None when it cannot.
    """
    paths: dict[str, str] = {}  # "v2" or "v1" (the hierarchy with the cpu controller) -> path
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif "cpu" in parts[1].split(","):
            paths["v1"] = parts[2]
    texts: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        fstype, options = after[0], (after[2] if len(after) > 2 else "")
        if fstype == "cgroup2":
            kind = "v2"
        elif fstype == "cgroup" and "cpu" in options.split(","):
            kind = "v1"
        else:
            continue
        path, root, mount = paths.get(kind), fields[3], fields[4]
        if path is None:
            continue
        if root != "/" and (path == root or path.startswith(root + "/")):
            path = path[len(root):]
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            where = os.path.join(mount, *parts[:depth])
            if kind == "v2":
                text = read(os.path.join(where, "cpu.max"))
                if text is not None:
                    texts.append(text)
                continue
            quota = read(os.path.join(where, "cpu.cfs_quota_us"))
            period = read(os.path.join(where, "cpu.cfs_period_us"))
            if quota is not None and period is not None:
                q = quota.strip()
                texts.append(f"{'max' if q.startswith('-') else q} {period.strip()}")
    return texts


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def usable_cpus() -> float:
    """CPUs this process may use: its affinity mask, bounded by its cgroup's CPU quota (v2 or v1)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    cgroup, mountinfo = _read_text("/proc/self/cgroup"), _read_text("/proc/self/mountinfo")
    texts = cgroup_quotas(cgroup, mountinfo, _read_text) if cgroup and mountinfo else []
    return cpus_from(affinity, texts)
