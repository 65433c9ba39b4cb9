"""The autotune policy (pyloader._tune) on simulated timings: deterministic, no clock."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pyloader import _tune
from pyloader._tune import Limits, Measurement, Settings, Tuner, cpus_from, decide

MiB = 1 << 20


def measurement(**changes: object) -> Measurement:
    base = dict(epoch=2, batches=100, wall_s=2.0, wait_s=1.8, load_p50_s=0.04, load_p95_s=0.05,
                busy_fraction=0.95, gil_share=0.92, cpu_used=1.0, batch_bytes=MiB)
    base.update(changes)
    return Measurement(**base)  # type: ignore[arg-type]


LIMITS = Limits(cpus=4.0, max_pool_bytes=1 << 30)
THREADS = Settings("thread", 4, 8)


def test_cpus_from_takes_the_tightest_of_affinity_and_cgroup_quotas() -> None:
    assert cpus_from(8, []) == 8.0
    assert cpus_from(8, ["max 100000\n"]) == 8.0
    assert cpus_from(8, ["150000 100000\n"]) == 1.5
    assert cpus_from(8, ["max 100000", "400000 100000", "300000 100000"]) == 3.0
    assert cpus_from(2, ["400000 100000"]) == 2.0
    assert cpus_from(4, ["10000 100000"]) == 1.0  # below one CPU: still one worker
    assert cpus_from(4, ["garbage", "1 2 3", "x 100000"]) == 4.0
    assert cpus_from(0, []) == 1.0


def test_usable_cpus_is_at_least_one_and_at_most_the_affinity() -> None:
    import os

    cpus = _tune.usable_cpus()
    assert 1.0 <= cpus <= len(os.sched_getaffinity(0))


def test_cgroup_quotas_are_read_from_v2_and_v1_hierarchies_and_a_containers_root(tmp_path) -> None:
    # cgroup v2 at <tmp>/v2, the process in /jobs/train (its parent has a quota of 3 CPUs).
    v2 = tmp_path / "v2"
    (v2 / "jobs" / "train").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "jobs" / "cpu.max").write_text("300000 100000\n")
    (v2 / "jobs" / "train" / "cpu.max").write_text("max 100000\n")
    # cgroup v1 (cpu,cpuacct) at <tmp>/v1, mounted as a container sees it: its own cgroup
    # /docker/abc is the mount's root.
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    cgroup = "4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n0::/jobs/train\n"
    mountinfo = (
        f"30 23 0:27 / {v2} rw,relatime - cgroup2 cgroup2 rw\n"
        f"32 31 0:29 /docker/abc {v1} rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "33 31 0:30 / /elsewhere rw,relatime - cgroup cgroup rw,memory\n"
        "40 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
    )

    read = _tune._read_text  # what usable_cpus() reads the files with

    texts = _tune.cgroup_quotas(cgroup, mountinfo, read)
    assert sorted(texts) == sorted(["max 100000\n", "300000 100000\n", "max 100000\n", "150000 100000"])
    assert cpus_from(8, texts) == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cpus_from(8, _tune.cgroup_quotas(cgroup, mountinfo, read)) == 3.0
    assert _tune.cgroup_quotas("", mountinfo, read) == []


def test_an_epoch_too_short_to_tell_changes_nothing() -> None:
    for m in (measurement(batches=_tune.MIN_BATCHES - 1), measurement(wall_s=_tune.MIN_EPOCH_S / 2, wait_s=0.1)):
        d = decide(THREADS, m, LIMITS)
        assert d.settings == THREADS and d.reasons == ()


def test_the_gil_held_while_the_loop_waits_moves_threads_to_processes_with_the_reason() -> None:
    d = decide(THREADS, measurement(), LIMITS)
    assert d.settings.mode == "process"
    assert d.settings.workers == 4  # one per usable CPU
    assert d.reasons[0].startswith("epoch 2: thread -> process: the GIL was held 92% of the time")


def test_processes_are_not_chosen_without_cpus_auto_mode_a_python_sequence_or_a_long_epoch() -> None:
    cases = [
        Limits(cpus=1.0, max_pool_bytes=1 << 30),
        Limits(cpus=1.9, max_pool_bytes=1 << 30),  # a quota of less than two CPUs
        Limits(cpus=4.0, max_pool_bytes=1 << 30, auto_mode=False),
        Limits(cpus=4.0, max_pool_bytes=1 << 30, process_ok=False),  # an ArraySequence
    ]
    for limits in cases:
        assert decide(THREADS, measurement(), limits).settings.mode == "thread", limits
    short = measurement(wall_s=_tune.MIN_SWITCH_S * 0.9, wait_s=_tune.MIN_SWITCH_S * 0.8)
    assert decide(THREADS, short, LIMITS).settings.mode == "thread"
    for gil in (None, 0.3, _tune.GIL_SWITCH - 0.01):
        assert decide(THREADS, measurement(gil_share=gil), LIMITS).settings.mode == "thread", gil


def test_a_switch_keeps_the_users_worker_count() -> None:
    limits = Limits(cpus=4.0, max_pool_bytes=1 << 30, auto_workers=False)
    d = decide(Settings("thread", 3, 6), measurement(), limits)
    assert (d.settings.mode, d.settings.workers) == ("process", 3)


def test_a_gil_free_load_that_stalls_adds_workers_while_cpus_are_idle() -> None:
    # 4 workers 95% busy using 0.3 CPU: a load that waits, which may grow fourfold at a time.
    d = decide(THREADS, measurement(gil_share=0.05, cpu_used=0.3), LIMITS)
    assert d.settings.mode == "thread"
    assert d.settings.workers == 16  # at most quadrupling per decision, for a load that waits
    assert d.floor == 5  # four stalled: never back to them
    assert any("workers 4 -> 16: the loop waited 90% of the time" in r for r in d.reasons)
    # One that computes (2.5 of 4 CPUs used, 4 workers 95% busy) only doubles, to the CPUs.
    d = decide(Settings("thread", 2, 4), measurement(gil_share=0.05, cpu_used=1.5), LIMITS)
    assert d.settings.workers == 4


def test_workers_are_added_toward_the_count_that_feeds_the_step() -> None:
    # 100 batches in 2 s (50/s) with 4 workers; the step takes 12.5 ms (80/s wanted, +20%: 96/s).
    m = measurement(gil_share=0.0, cpu_used=0.3, wall_s=2.0, wait_s=0.75)
    assert m.step_s == 0.0125
    assert decide(THREADS, m, LIMITS).settings.workers == math.ceil(4 * 1.2 * 80 / 50)


def test_no_thread_is_added_when_every_cpu_is_busy_or_the_workers_wait() -> None:
    busy_cpus = measurement(gil_share=0.0, cpu_used=3.8)
    assert decide(THREADS, busy_cpus, LIMITS).settings.workers == 4
    idle_workers = measurement(gil_share=0.0, cpu_used=0.5, busy_fraction=0.3)
    d = decide(THREADS, idle_workers, LIMITS)
    assert d.settings.workers == 2  # ceil(4 * 0.3 / 0.7): the loop waits on something else
    assert "the workers were only 30% busy: fewer load as much" in d.reasons[0]


def test_busy_threads_beyond_the_busy_cpus_drop_to_one_per_cpu_but_never_below_the_floor() -> None:
    m = measurement(gil_share=0.1, cpu_used=1.8)
    two = Limits(cpus=2.0, max_pool_bytes=1 << 30)
    d = decide(THREADS, m, two)
    assert d.settings.workers == 2
    assert "no CPU to spare (this process used 1.8 of the 2 it may use)" in d.reasons[0]
    assert decide(THREADS, m, two, floor=3).settings.workers == 3
    # A load that leaves the CPUs mostly idle (waits) may run more threads than CPUs, even on a
    # machine others keep busy; one that computes may not, once the machine has no CPU idle.
    waiting = measurement(gil_share=0.1, cpu_used=0.2, idle_cpus=0.0)
    assert decide(THREADS, waiting, two).settings.workers == 16  # 4 -> 16: up to 16 per CPU
    computing = measurement(gil_share=0.1, cpu_used=1.2, idle_cpus=0.1)  # others take the rest
    d = decide(THREADS, computing, two)
    assert d.settings.workers == 2 and "0.1 idle on the machine" in d.reasons[0]
    one = measurement(gil_share=0.1, cpu_used=0.9, idle_cpus=0.9)
    assert decide(Settings("thread", 1, 2), one, two).settings.workers == 2  # a CPU is idle


def test_a_consumer_bottleneck_drops_idle_workers_but_never_below_the_floor() -> None:
    m = measurement(wait_s=0.001, busy_fraction=0.2, gil_share=0.0)
    d = decide(Settings("thread", 8, 16), m, LIMITS)
    assert d.settings.workers == math.ceil(8 * 0.2 / _tune.BUSY_TARGET)
    assert "the consumer is the bottleneck" in d.reasons[0]
    assert decide(Settings("thread", 8, 16), m, LIMITS, floor=6).settings.workers == 6


def test_depth_follows_the_load_time_spread_within_max_pool_bytes() -> None:
    uneven = measurement(gil_share=0.0, cpu_used=3.9, load_p50_s=0.25, load_p95_s=0.875)
    assert decide(THREADS, uneven, LIMITS).settings.depth == 14  # ceil(4 * 3.5)
    tight = Limits(cpus=4.0, max_pool_bytes=9 * MiB)
    d = decide(THREADS, uneven, tight)
    assert d.settings.depth == 9 - _tune.HELD_BATCHES
    assert "capped by max_pool_bytes" in d.reasons[-1]


def test_depth_does_not_grow_for_idle_workers() -> None:
    uneven = measurement(gil_share=0.0, cpu_used=3.9, load_p50_s=0.25, load_p95_s=0.875, busy_fraction=0.6)
    assert decide(THREADS, uneven, LIMITS).settings.depth == 14
    idle = measurement(gil_share=0.0, cpu_used=3.9, load_p50_s=0.25, load_p95_s=0.875, busy_fraction=0.45,
                       wait_s=0.001)
    assert decide(Settings("thread", 2, 4), idle, LIMITS, floor=2).settings.depth == 4


def test_a_small_growth_of_depth_is_not_worth_a_restart() -> None:
    m = measurement(gil_share=0.0, cpu_used=3.9, load_p50_s=0.25, load_p95_s=0.625)  # wants 10
    assert decide(THREADS, m, LIMITS).settings.depth == 8


def test_process_mode_never_runs_more_workers_than_cpus() -> None:
    d = decide(Settings("process", 6, 12), measurement(gil_share=None, cpu_used=None), LIMITS)
    assert d.settings.workers == 4


# ---- properties ---------------------------------------------------------------------------------

def simulate(s: Settings, load_s: float, step_s: float, gil: float, cpus: float, epoch: int) -> Measurement:
    """One epoch of 200 batches: workers load in parallel, as far as the CPUs and (in thread
    mode) the GIL let them; the consumer takes ``step_s`` per batch."""
    parallel = min(float(s.workers), max(1.0, cpus))
    if s.mode == "thread" and gil > 0:
        parallel = min(parallel, 1.0 / gil)
    load_rate = parallel / load_s
    rate = min(load_rate, 1.0 / step_s) if step_s > 0 else load_rate
    batches = 200
    wall = batches / rate
    wait = max(0.0, wall - batches * step_s)
    return Measurement(
        epoch=epoch, batches=batches, wall_s=wall, wait_s=wait, load_p50_s=load_s,
        load_p95_s=load_s * 1.2, busy_fraction=min(1.0, rate * load_s / s.workers),
        gil_share=min(1.0, gil * parallel) if s.mode == "thread" else None,
        cpu_used=min(cpus, rate * load_s) if s.mode == "thread" else None, batch_bytes=MiB,
    )


limits_st = st.builds(
    Limits,
    cpus=st.floats(1.0, 16.0),
    max_pool_bytes=st.integers(MiB, 1 << 32),
    auto_mode=st.booleans(),
    auto_workers=st.booleans(),
    auto_depth=st.booleans(),
    process_ok=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    limits=limits_st,
    workers=st.integers(1, 16),
    depth=st.integers(1, 64),
    load_s=st.floats(0.001, 0.5),
    step_s=st.floats(0.0, 0.5),
    gil=st.floats(0.0, 1.0),
)
def test_the_tuner_obeys_every_explicit_setting_and_bound_and_settles(
    limits: Limits, workers: int, depth: int, load_s: float, step_s: float, gil: float
) -> None:
    tuner = Tuner(Settings("thread", workers, depth), limits)
    history = []
    for epoch in range(24):
        before = tuner.settings
        after = tuner.observe(simulate(before, load_s, step_s, gil, limits.cpus, epoch))
        history.append(after)
        if not limits.auto_workers:
            assert after.workers == workers
        if not limits.auto_depth:
            assert after.depth == depth
        if not (limits.auto_mode and limits.process_ok):
            assert after.mode == "thread"
        assert after.workers >= 1 and after.depth >= 1
        if limits.auto_workers and after.workers != before.workers:
            assert after.workers <= max(limits.max_workers(after.mode), before.workers)
        if after.mode == "process" and limits.auto_workers:
            assert after.workers <= limits.cpu_count
        if limits.auto_depth and after.depth != before.depth:
            assert after.depth == 1 or after.depth * MiB <= limits.max_pool_bytes
        if before.mode == "process":
            assert after.mode == "process"  # never back
        assert len(tuner.decisions) >= sum(1 for a, b in zip(history, history[1:]) if a != b)
    assert len(set(history[-8:])) == 1, history  # it settles: no oscillation


@settings(max_examples=100, deadline=None)
@given(gil=st.floats(0.8, 1.0), cpus=st.floats(2.0, 16.0), load_s=st.floats(0.005, 0.1))
def test_a_gil_bound_load_with_a_fast_consumer_ends_in_process_mode(gil: float, cpus: float, load_s: float) -> None:
    tuner = Tuner(Settings("thread", 4, 8), Limits(cpus=cpus, max_pool_bytes=1 << 32))
    for epoch in range(4):
        tuner.observe(simulate(tuner.settings, load_s, 0.0, gil, cpus, epoch))
    assert tuner.settings.mode == "process"
    assert any("thread -> process" in r for r in tuner.decisions)


def test_the_tuner_decides_once_per_window() -> None:
    tuner = Tuner(THREADS, LIMITS)
    first = tuner.observe(measurement())
    assert tuner.observe(measurement()) == first
    assert len(tuner.decisions) == len(decide(THREADS, measurement(), LIMITS).reasons)


def test_a_window_that_ends_mid_pass_says_where() -> None:
    d = decide(THREADS, measurement(batch=48), LIMITS)
    assert d.reasons[0].startswith("epoch 2, batch 48: thread -> process: the GIL was held 92%")
    # The same window, a pass later: another decision (the tuner keys windows by epoch and batch).
    tuner = Tuner(Settings("thread", 2, 4), Limits(cpus=8.0, max_pool_bytes=1 << 30, auto_mode=False))
    light = dict(gil_share=0.0, cpu_used=0.05, busy_fraction=0.95)
    tuner.observe(measurement(batch=48, **light))
    tuner.observe(measurement(**light))
    assert tuner.settings.workers == 32 and [r.split(":")[0] for r in tuner.decisions[::2]] == [
        "epoch 2, batch 48", "epoch 2"]


def test_the_gil_is_no_longer_sampled_after_quiet_windows_in_a_row() -> None:
    tuner = Tuner(Settings("thread", 2, 4), Limits(cpus=2.0, max_pool_bytes=1 << 30))
    assert tuner.sample_gil
    tuner.observe(measurement(epoch=0, gil_share=0.1, busy_fraction=0.6))
    tuner.observe(measurement(epoch=1, gil_share=0.5, busy_fraction=0.6))  # not quiet: counts again
    tuner.observe(measurement(epoch=2, gil_share=0.1, busy_fraction=0.6))
    assert tuner.sample_gil
    tuner.observe(measurement(epoch=3, gil_share=0.0, busy_fraction=0.6))
    assert not tuner.sample_gil and tuner.settings.mode == "thread"
    assert tuner.decisions[-1].startswith("epoch 3: threads stay: the GIL was held under 30%")
    # Nothing to sample where the mode is not the tuner's to change, or once it is processes.
    assert not Tuner(THREADS, Limits(cpus=4.0, max_pool_bytes=1 << 30, auto_mode=False)).sample_gil
    assert not Tuner(THREADS, Limits(cpus=4.0, max_pool_bytes=1 << 30, process_ok=False)).sample_gil
    switched = Tuner(THREADS, LIMITS)
    switched.observe(measurement())
    assert switched.settings.mode == "process" and not switched.sample_gil
