"""Autotune on the Prefetcher (workers/depth/mode="auto"): real loads, in subprocesses with timeouts.

The policy itself is tested on simulated timings in test_tune.py; these tests check that the
Prefetcher measures, decides and applies mid-pass and at epoch boundaries without losing or
repeating a batch.
No assertion is on a speed: only on the decisions that follow from what a Sequence does (holding
the GIL or releasing it) and on the batches delivered.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

import pyloader
from pyloader import _tune

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process mode uses fork and /proc"),
    pytest.mark.skipif(_tune.usable_cpus() < 2, reason="thread -> process needs two usable CPUs"),
]

# A Sequence whose __getitem__ holds the GIL (a fixed amount of pure-Python work, ~10-20 ms), and
# one that releases it (time.sleep). Batch i is i, with an offset the epoch hook moves: the
# batches show which hooks ran before they were loaded, in whichever process.
SEQUENCES = """
import time
import numpy as np

class Gil:
    def __init__(self, n=80, hook=False):
        self.n, self.offset = n, 0
        if hook:
            self.on_epoch_end = self._end
    def _end(self):
        self.offset += 1000
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        x = 0
        for k in range(250_000):
            x += k
        return np.full(4, i + self.offset, dtype=np.int64)

class Sleepy:
    def __len__(self):
        return 120
    def __getitem__(self, i):
        time.sleep(0.02)
        return np.full(4, i, dtype=np.int64)
"""


def run(code: str, python_subprocess, timeout: float = 240.0) -> dict:
    done = python_subprocess(SEQUENCES + code, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_auto_moves_a_gil_holding_sequence_to_processes_keeping_every_batch_once_in_order(python_subprocess):
    out = run("""
import json, pyloader
seq = Gil(hook=True)
epochs, modes = [], []
with pyloader.Prefetcher(seq, shuffle=True, seed=7) as p:
    for _ in range(3):
        epochs.append([int(b[0]) for b in p])
        modes.append(p.mode)
    auto = p.stats()["autotune"]
    pids = p.worker_pids()
print(json.dumps({"epochs": epochs, "modes": modes, "auto": auto, "pids": pids}))
""", python_subprocess)
    from pyloader._plan import Plan

    plan = Plan(80, True, 7, 0, 1, False)
    for epoch, got in enumerate(out["epochs"]):
        # The hook of each earlier epoch ran before any batch of this one loaded (in the worker
        # processes too, which replay it), every batch once, in the plan's order.
        assert got == [int(i) + 1000 * epoch for i in plan.indices(epoch)], epoch
    assert out["modes"][-1] == "process"
    assert out["auto"]["mode"] == "process" and len(out["pids"]) == out["auto"]["workers"]
    switch = [d for d in out["auto"]["decisions"] if "thread -> process" in d]
    # Decided within epoch 0 (mid-pass, or at its end on a slow machine).
    assert len(switch) == 1 and re.match(r"epoch 0(, batch \d+)?: thread -> process: the GIL was held", switch[0])


def test_a_switch_mid_epoch_keeps_every_batch_once_in_order_and_the_hooks_once(python_subprocess):
    # One long epoch (~3 s on two threads): the switch comes after its first window (0.5 s), at a
    # batch of epoch 0, by restarting the engine there; the hook runs once per epoch all the same.
    out = run("""
import json, pyloader
seq = Gil(240, hook=True)
with pyloader.Prefetcher(seq, shuffle=True, seed=11) as p:
    first = []
    for b in p:
        first.append(int(b[0]))
        if len(first) == 200:
            state = p.state_dict()
    second = [int(b[0]) for b in p]
    auto, epochs = p.stats()["autotune"], p.stats()["epochs"]
print(json.dumps({"first": first, "second": second, "state": state, "auto": auto,
                  "records": [(e["epoch"], e["batches"]) for e in epochs]}))
""", python_subprocess)
    from pyloader._plan import Plan

    plan = Plan(240, True, 11, 0, 1, False)
    assert out["first"] == [int(i) for i in plan.indices(0)]
    assert out["second"] == [int(i) + 1000 for i in plan.indices(1)]
    switch = [d for d in out["auto"]["decisions"] if "thread -> process" in d]
    assert len(switch) == 1, out["auto"]["decisions"]
    batch = int(re.match(r"epoch 0, batch (\d+): thread -> process", switch[0]).group(1))
    assert 16 <= batch < 240 - 2 * _tune.initial_workers(_tune.usable_cpus())
    assert out["state"]["epoch"] == 0 and out["state"]["batches_consumed"] == 200
    # The epoch split over two engines is one record of its 240 batches.
    assert out["records"] == [[0, 240], [1, 240]]


def test_workers_are_added_mid_epoch_for_a_load_that_waits(python_subprocess):
    out = run("""
import json, pyloader
with pyloader.Prefetcher(Sleepy()) as p:
    got = [int(b[0]) for b in p]
    auto = p.stats()["autotune"]
print(json.dumps({"got": got, "auto": auto}))
""", python_subprocess)
    assert out["got"] == list(range(120))
    grown = r"epoch 0, batch \d+: workers \d+ -> \d+: the loop waited"
    added = [d for d in out["auto"]["decisions"] if re.match(grown, d)]
    assert added, out["auto"]["decisions"]


def test_auto_keeps_threads_for_a_sequence_that_releases_the_gil(python_subprocess):
    out = run("""
import json, pyloader
with pyloader.Prefetcher(Sleepy()) as p:
    epochs = [[int(b[0]) for b in p] for _ in range(3)]
    auto = p.stats()["autotune"]
print(json.dumps({"epochs": epochs, "auto": auto}))
""", python_subprocess)
    assert out["epochs"] == [list(range(120))] * 3
    assert out["auto"]["mode"] == "thread"
    assert not any("process" in d for d in out["auto"]["decisions"]), out["auto"]["decisions"]
    # The loop waited on sleeping workers with CPUs idle: workers were added, and said why.
    assert out["auto"]["workers"] > _tune.initial_workers(_tune.usable_cpus())
    assert any("workers" in d and "the loop waited" in d for d in out["auto"]["decisions"])


def test_worker_processes_that_cannot_start_leave_threads_loading_and_say_why(python_subprocess):
    out = run("""
import json, pyloader
seq = Gil(80)
seq.unpicklable = lambda: None  # spawn pickles the Sequence: this one cannot be
with pyloader.Prefetcher(seq, start_method="spawn") as p:
    epochs = [[int(b[0]) for b in p] for _ in range(3)]
    auto = p.stats()["autotune"]
print(json.dumps({"epochs": epochs, "auto": auto}))
""", python_subprocess)
    assert out["epochs"] == [list(range(80))] * 3
    assert out["auto"]["mode"] == "thread"
    failed = [d for d in out["auto"]["decisions"] if "worker processes could not start" in d]
    assert len(failed) == 1 and "threads go on" in failed[0], out["auto"]["decisions"]


def test_explicit_settings_are_obeyed(python_subprocess):
    out = run("""
import json, pyloader
with pyloader.Prefetcher(Gil(40), workers=3, depth=5, mode="thread") as p:
    epochs = [[int(b[0]) for b in p] for _ in range(2)]
    print(json.dumps({"epochs": epochs, "settings": [p.mode, p.workers, p.depth],
                      "auto": p.stats()["autotune"]}))
""", python_subprocess)
    assert out["epochs"] == [list(range(40))] * 2
    assert out["settings"] == ["thread", 3, 5]
    assert out["auto"] is None


def test_an_interrupted_pass_is_not_tuned_on_and_resumes_exactly(python_subprocess):
    out = run("""
import json, pyloader
with pyloader.Prefetcher(Gil(40)) as p:
    first = []
    for b in p:
        first.append(int(b[0]))
        if len(first) == 10:
            break
    state = p.state_dict()
    second = [int(b[0]) for b in p]
    auto = p.stats()["autotune"]
print(json.dumps({"first": first, "second": second, "state": state, "auto": auto}))
""", python_subprocess)
    assert out["first"] == list(range(10))
    assert out["state"]["batches_consumed"] == 10
    assert out["second"] == list(range(40))  # the next epoch, whole
    assert out["auto"]["decisions"] == []


def test_defaults_are_auto():
    seq = [1, 2, 3]
    with pyloader.Prefetcher(seq) as p:
        assert p.stats()["autotune"] == {"mode": "thread", "workers": p.workers, "depth": p.depth,
                                         "decisions": []}
        assert p.workers == _tune.initial_workers(_tune.usable_cpus()) and p.depth == 2 * p.workers
        assert list(p) == [1, 2, 3]


# The machine's bounds: a Prefetcher with no settings reads the CPUs it may use from its affinity
# and its cgroup's quota, and never runs more busy workers than that (nor worker processes on one).
BOUNDED = """
import json, os, pyloader
from pyloader import _tune
{setup}
with pyloader.Prefetcher(Gil(80)) as p:
    epochs = [[int(b[0]) for b in p] for _ in range(2)]
    auto = p.stats()["autotune"]
print(json.dumps({{"cpus": _tune.usable_cpus(), "epochs": epochs, "auto": auto}}))
"""


def test_an_affinity_of_one_cpu_keeps_one_thread_and_no_processes(python_subprocess):
    out = run(BOUNDED.format(setup="os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})"), python_subprocess)
    assert out["cpus"] == 1.0
    assert out["epochs"] == [list(range(80))] * 2
    # The GIL-bound load stalls the loop, but a second worker would only take turns on the CPU.
    assert out["auto"]["mode"] == "thread" and out["auto"]["workers"] == 1, out["auto"]


def _cgroup_with_quota(tmp_name: str, quota: int, period: int) -> str | None:
    """A new cgroup under this process's own, with a CPU quota (v1 ``cpu`` or v2), or None where
    none can be made here (no permission, no cpu controller)."""
    with open("/proc/self/cgroup") as f:
        cgroup = f.read()
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f.read().splitlines() if " - " in line]
    for fields in mounts:
        after = fields[fields.index("-") + 1:]
        v2 = after[0] == "cgroup2"
        if not (v2 or (after[0] == "cgroup" and "cpu" in after[2].split(","))):
            continue
        for line in cgroup.splitlines():
            _, controllers, path = line.split(":", 2)
            if (controllers == "") != v2 or (not v2 and "cpu" not in controllers.split(",")):
                continue
            root = fields[3]
            rel = path[len(root):] if root != "/" and path.startswith(root) else path
            parent = os.path.join(fields[4], *[p for p in rel.split("/") if p])
            try:
                if v2:
                    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                        if "cpu" not in f.read().split():
                            continue
                where = os.path.join(parent, tmp_name)
                os.mkdir(where)
                if v2:
                    with open(os.path.join(where, "cpu.max"), "w") as f:
                        f.write(f"{quota} {period}")
                else:
                    with open(os.path.join(where, "cpu.cfs_period_us"), "w") as f:
                        f.write(str(period))
                    with open(os.path.join(where, "cpu.cfs_quota_us"), "w") as f:
                        f.write(str(quota))
                return where
            except OSError:
                continue
    return None


def test_a_cgroup_cpu_quota_bounds_the_workers(python_subprocess):
    where = _cgroup_with_quota(f"pyloader-test-{os.getpid()}", 150_000, 100_000)
    if where is None:
        pytest.skip("no cgroup with a CPU quota can be made here (needs write access to a cpu hierarchy)")
    try:
        setup = f"open({os.path.join(where, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))"
        out = run(BOUNDED.format(setup=setup), python_subprocess)
    finally:
        for _ in range(50):  # the subprocess has exited; its cgroup empties as the kernel reaps it
            try:
                os.rmdir(where)
                break
            except OSError:
                time.sleep(0.1)
    assert out["cpus"] == 1.5
    assert out["epochs"] == [list(range(80))] * 2
    # 1.5 CPUs: one whole one. No worker processes (they need two) and one busy thread.
    assert out["auto"]["mode"] == "thread" and out["auto"]["workers"] == 1, out["auto"]
