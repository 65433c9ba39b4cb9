"""Process mode (mode="process"): real worker processes, killed for real.

Every test runs its scenario in a fresh interpreter with a timeout (conftest.run_python), so that
a hang or a stray process fails one test, not the suite. The scenarios print "OK" at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest
from conftest import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process mode tests use /proc and fork")

PRELUDE = """
import gc, os, signal, sys, threading, time
import numpy as np
import pyloader
from sequences import ProcSeq
"""


def run_ok(body: str, *, timeout: float = 90.0) -> str:
    r = run_python(PRELUDE + textwrap.dedent(body), timeout=timeout)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if not gone(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


CONSUMER = PRELUDE + """
import psutil
p = pyloader.Prefetcher(ProcSeq(10_000, sleep=%r), mode="process", workers=2)
it = iter(p)
next(it)
print(" ".join(map(str, p.worker_pids() + [p._workers._proc.pid])), flush=True)
"""


def start_consumer(sleep: float, rest: str, **popen: Any) -> tuple[subprocess.Popen, list[int]]:
    """A consumer process mid-epoch (then running `rest`); returns it and its workers' and
    zygote's pids."""
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER % sleep + textwrap.dedent(rest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), **popen)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 3, proc.stderr.read() if not pids else pids
    return proc, pids


def test_batches_in_order_match_thread_mode():
    run_ok("""
    def run(mode):
        seq = ProcSeq(40, shape=(300, 300))  # 360 KB: written into the shared buffer
        out = []
        with pyloader.Prefetcher(seq, mode=mode, workers=2, shuffle=True, seed=3) as p:
            for epoch in range(2):
                for arr, i, meta in p:
                    assert arr.shape == (300, 300) and arr.dtype == np.float32
                    assert (arr == i).all()
                    out.append((i, meta["name"], meta["epoch"]))
        return out
    assert run("process") == run("thread")
    small = []
    with pyloader.Prefetcher(ProcSeq(30), mode="process", workers=3) as p:  # inline batches
        small = [int(arr[0]) for arr, i, meta in p]
    assert small == list(range(30)), small
    print("OK")
    """)


def test_structures_match_thread_mode():
    run_ok("""
    from collections import namedtuple
    Pair = namedtuple("Pair", "x y")
    class Mixed:
        def __len__(self): return 6
        def __getitem__(self, i):
            if i == 5:
                return pyloader.stack([{"a": np.full(3, k), "b": float(k), "s": f"s{k}"} for k in range(4)])
            return {
                "pair": Pair(np.arange(i + 1, dtype=np.int16), [np.zeros((0, 3)), "text", None]),
                "scalar": np.float64(i), "zero_d": np.array(i), "n": i,
                "big": np.full((200, 100), i, dtype=np.float64),
                "strided": np.arange(40, dtype=np.int32).reshape(4, 10)[:, ::3],
            }
    def collect(mode):
        with pyloader.Prefetcher(Mixed(), mode=mode, workers=2) as p:
            return list(p)
    def same(a, b):
        assert type(a) is type(b), (type(a), type(b))
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), (a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for k in a: same(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b): same(x, y)
        else:
            assert a == b, (a, b)
    for x, y in zip(collect("process"), collect("thread")):
        same(x, y)
    print("OK")
    """)


def test_sigkill_workers_at_random_moments_loses_nothing():
    out = run_ok("""
    import random
    rng = random.Random(int(os.environ.get("SEED", "1")))
    seq = ProcSeq(240, shape=(256, 256), sleep=0.004)
    kills = 0
    with pyloader.Prefetcher(seq, mode="process", workers=2, depth=6) as p:
        stop = threading.Event()
        def killer():
            global kills
            while not stop.wait(rng.uniform(0.02, 0.08)):
                try:
                    os.kill(rng.choice(p.worker_pids()), signal.SIGKILL)
                    kills += 1
                except (ProcessLookupError, IndexError):
                    pass
        t = threading.Thread(target=killer)
        t.start()
        try:
            for epoch in range(2):
                got = []
                for arr, i, meta in p:
                    assert (arr == i).all(), i
                    got.append(i)
                assert got == list(range(240)), got
        finally:
            stop.set()
            t.join()
        assert kills >= 5, kills
        assert len(set(p.worker_pids())) == 2
    print("kills", kills)
    print("OK")
    """, timeout=120)
    assert "kills" in out


def test_poison_index_fails_clearly_then_next_epoch_works():
    run_ok("""
    seq = ProcSeq(20, shape=(64, 64), crash_at=(5,), crash_epoch=0)
    with pyloader.Prefetcher(seq, mode="process", workers=2, max_retries=2) as p:
        it = iter(p)
        got = []
        for k in range(20):
            try:
                arr, i, meta = next(it)
                got.append(i)
            except pyloader.WorkerDiedError as e:
                assert k == 5 and e.index == 5 and e.epoch == 0 and e.position == 5
                msg = str(e)
                assert "Sequence index 5" in msg and "3 worker processes died" in msg, msg
                assert msg.count("SIGSEGV") == 3, msg
                assert isinstance(e, pyloader.BatchError)
        assert got == [i for i in range(20) if i != 5], got
        assert list(it) == []
        # on_epoch_end ran here and in every worker (replacements too): epoch 1 has no crash
        second = [(i, meta["epoch"]) for arr, i, meta in p]
        assert second == [(i, 1) for i in range(20)], second
        assert seq.epoch == 2  # this process's copy: after epochs 0 and 1
    print("OK")
    """)


def test_worker_exception_carries_its_traceback():
    run_ok("""
    with pyloader.Prefetcher(ProcSeq(8, raise_at=(3,)), mode="process", workers=2) as p:
        it = iter(p)
        assert [next(it)[1] for _ in range(3)] == [0, 1, 2]
        try:
            next(it)
        except pyloader.BatchError as e:
            assert e.index == 3 and type(e).__name__ == "BatchError"
            cause = e.__cause__
            assert isinstance(cause, ValueError) and str(cause) == "bad batch 3"
            notes = "\\n".join(cause.__notes__)
            assert "Traceback in worker process" in notes and "raise ValueError" in notes, notes
            assert "sequences.py" in notes, notes
        else:
            raise AssertionError("no error")
        assert [b[1] for b in it] == [4, 5, 6, 7]
    class NoneSeq:
        def __len__(self): return 3
        def __getitem__(self, i): return None if i == 1 else np.zeros(2)
    with pyloader.Prefetcher(NoneSeq(), mode="process", workers=1) as p:
        it = iter(p)
        next(it)
        try:
            next(it)
        except TypeError as e:
            assert str(e).startswith("__getitem__(1) returned None"), e
        else:
            raise AssertionError("no TypeError")
    class Unpicklable:
        def __len__(self): return 2
        def __getitem__(self, i): return np.zeros(2), (lambda: i)
    with pyloader.Prefetcher(Unpicklable(), mode="process", workers=1) as p:
        try:
            list(p)
        except pyloader.BatchError as e:
            assert e.index == 0 and "pickle" in repr(e.__cause__).lower(), repr(e.__cause__)
        else:
            raise AssertionError("no error")
    print("OK")
    """)


def test_workers_exit_when_the_consumer_is_killed():
    proc, pids = start_consumer(0.05, "time.sleep(60)")
    try:
        assert all(not gone(pid) for pid in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(pids) == [], "workers or zygote outlived their consumer"
    finally:
        proc.kill()
        proc.communicate()


def test_close_leaves_no_process_thread_or_descriptor():
    run_ok("""
    import psutil
    me = psutil.Process()
    def fds(): return sorted(os.listdir("/proc/self/fd"))
    before_fds, before_threads = fds(), me.num_threads()
    all_pids = []
    for round in range(3):
        p = pyloader.Prefetcher(ProcSeq(30, shape=(100, 100)), mode="process", workers=2)
        for epoch in range(2):
            assert [b[1] for b in p] == list(range(30))
        os.kill(p.worker_pids()[0], signal.SIGKILL)  # a replacement too
        assert [b[1] for b in p] == list(range(30))
        all_pids += p.worker_pids() + [p._workers._proc.pid]
        p.close()
        p.close()  # idempotent
    assert me.children(recursive=True) == [], me.children(recursive=True)
    for pid in all_pids:
        assert not psutil.pid_exists(pid), pid
    assert fds() == before_fds, (before_fds, fds())
    # (fewer is fine: OpenBLAS stops its threads around a fork and starts them again lazily)
    assert me.num_threads() <= before_threads, (before_threads, me.num_threads())
    print("OK")
    """)


def test_gc_and_interpreter_exit_leave_no_process():
    r = run_python(PRELUDE + """
p = pyloader.Prefetcher(ProcSeq(100, sleep=0.01), mode="process", workers=2)
next(iter(p))
first = p.worker_pids() + [p._workers._proc.pid]
del p
gc.collect()
import psutil
assert psutil.Process().children(recursive=True) == []
q = pyloader.Prefetcher(ProcSeq(100, sleep=0.01), mode="process", workers=2)
next(iter(q))
print(" ".join(map(str, first + q.worker_pids() + [q._workers._proc.pid])), flush=True)
# exits with q open and mid-epoch
""", timeout=60)
    assert r.returncode == 0, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 6
    assert wait_gone(pids, 5.0) == []


def test_close_does_not_wait_for_a_hung_worker():
    run_ok("""
    class Hang:
        def __len__(self): return 10
        def __getitem__(self, i):
            if i == 2:
                time.sleep(3600)
            return np.full(4, i)
    p = pyloader.Prefetcher(Hang(), mode="process", workers=2, timeout=0.5)
    it = iter(p)
    assert [int(next(it)[0]) for _ in range(2)] == [0, 1]
    try:
        next(it)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no timeout")
    pids = p.worker_pids()
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 5, time.monotonic() - t0
    import psutil
    assert not any(psutil.pid_exists(pid) for pid in pids)
    print("OK")
    """)


def test_restart_mid_batch_replaces_the_busy_worker():
    # set_epoch while a worker is mid-load: the new pass must not receive the stale answer.
    run_ok("""
    seq = ProcSeq(12, shape=(200, 200), sleep=0.05)
    with pyloader.Prefetcher(seq, mode="process", workers=2, shuffle=True, seed=1) as p:
        it = iter(p)
        next(it)
        p.set_epoch(3)
        got = [i for _, i, _ in p]
        with pyloader.Prefetcher(ProcSeq(12), shuffle=True, seed=1) as ref:
            ref.set_epoch(3)
            assert got == [i for _, i, _ in ref], got
    print("OK")
    """)


def test_renew_reaches_every_worker_and_replacements_in_hook_order():
    """Prefetcher._renew (what pyloader.torch's persistent workers use) calls a method on every
    worker's copy; a worker forked later replays the epoch hooks and the latest renewal in the
    order the consumer ran them, so its batches are the same. A renewal that fails in a worker
    fails that worker's batches, saying so."""
    run_ok("""
    consumer = os.getpid()

    class Renewed:
        def __init__(self):
            self.offset, self.ends = 0, 0

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return np.array([i + self.offset, self.ends, os.getpid()])

        def set_offset(self, k):
            if k < 0 and os.getpid() != consumer:
                raise ValueError("not in a worker")
            self.offset = k

        def on_epoch_end(self):
            self.ends += 1

    p = pyloader.Prefetcher(Renewed(), mode="process", workers=2)
    # As pyloader.torch, which renews before every pass: no next epoch loading ahead, whose
    # workers a renewal's engine stop would catch mid-conversation (and replace).
    p._plan_ahead = False
    assert [int(b[0]) for b in p] == list(range(12))
    pids = p.worker_pids()
    p._renew("set_offset", 100)
    got = list(p)
    assert [(int(b[0]), int(b[1])) for b in got] == [(100 + i, 1) for i in range(12)], got
    assert p.worker_pids() == pids and {int(b[2]) for b in got} <= set(pids)
    for victim in pids:  # every worker replaced: the newcomers replay hook, renewal, hook
        os.kill(victim, signal.SIGKILL)
    p._renew("set_offset", 200)
    got = list(p)
    assert [(int(b[0]), int(b[1])) for b in got] == [(200 + i, 2) for i in range(12)], got
    assert not set(p.worker_pids()) & set(pids)
    p._renew("set_offset", -1)
    it = iter(p)
    try:
        next(it)
    except pyloader.BatchError as e:
        assert "updating the worker's copy of the Sequence failed: ValueError: not in a worker" in str(e.__cause__), e
    else:
        raise AssertionError("a failed renewal went unnoticed")
    p.close()
    print("OK")
    """)


def test_state_dict_resume_matches_thread_mode():
    run_ok("""
    def consume(p, n):
        out = []
        while len(out) < n:
            for _, i, _ in p:
                out.append(i)
                if len(out) == n:
                    break
        return out
    a = pyloader.Prefetcher(ProcSeq(15), mode="process", workers=2, shuffle=True, seed=9)
    first = consume(a, 20)
    state = a.state_dict()
    a.close()
    b = pyloader.Prefetcher(ProcSeq(15), mode="process", workers=2, shuffle=True, seed=0)
    b.load_state_dict(state)
    rest = consume(b, 25)
    b.close()
    t = pyloader.Prefetcher(ProcSeq(15), shuffle=True, seed=9)
    assert first + rest == consume(t, 45)
    t.close()
    print("OK")
    """)


def test_worker_init_fn_and_per_worker_seeds():
    run_ok("""
    from sequences import WorkerFacts, init_marker
    def run():
        with pyloader.Prefetcher(WorkerFacts(), mode="process", workers=2, seed=5,
                                 worker_init_fn=init_marker) as p:
            facts = list(p)
            return facts, p.worker_pids()
    facts, pids = run()
    assert [f[0] for f in facts] == list(range(8))
    by_worker = {}
    for i, pid, marker, draw in facts:
        assert pid in pids
        wid, init_draw = marker.split(":")
        by_worker.setdefault(int(wid), set()).add(init_draw)
    assert set(by_worker) == {0, 1}, by_worker
    assert all(len(v) == 1 for v in by_worker.values())
    assert by_worker[0] != by_worker[1]  # seeded per worker
    facts2, _ = run()
    markers = lambda fs: {m for _, _, m, _ in fs}
    assert markers(facts) == markers(facts2)  # seeded from (seed, worker_id): reproducible
    print("OK")
    """)


def test_spawn_needs_a_picklable_sequence_and_says_so():
    run_ok("""
    class Locked:
        def __init__(self): self.lock = threading.Lock()
        def __len__(self): return 2
        def __getitem__(self, i): return np.zeros(2)
    for method in ("spawn", "forkserver"):
        try:
            pyloader.Prefetcher(Locked(), mode="process", workers=1, start_method=method)
        except TypeError as e:
            msg = str(e)
            assert f"start_method={method!r}" in msg and "cannot be pickled" in msg and "Locked" in msg, msg
            assert "start_method='fork'" in msg, msg
        else:
            raise AssertionError("no TypeError")
    try:
        pyloader.Prefetcher(ProcSeq(2), mode="process", start_method="spawn", worker_init_fn=lambda w: None)
    except TypeError as e:
        assert "worker_init_fn" in str(e)
    else:
        raise AssertionError("no TypeError")
    import psutil
    assert psutil.Process().children(recursive=True) == []
    print("OK")
    """)


@pytest.mark.parametrize("blob", [0, 8 << 20], ids=["small", "8MB"])
def test_spawn_from_an_unguarded_main_module_reports_multiprocessings_own_error(tmp_path, blob):
    """A script that makes a spawn-mode Prefetcher without ``if __name__ == "__main__"``: the
    zygote re-runs the script and cannot start a process itself. The user must see why
    (multiprocessing's bootstrapping message), not an error from pyloader's cleanup. With a
    Sequence larger than a pipe's buffer this hung while the Sequence went through
    multiprocessing's pipe (its writer holds the read end until the write ends)."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import pyloader
        from sequences import ProcSeq
        seq = ProcSeq(4)
        seq.blob = bytes(%d)
        p = pyloader.Prefetcher(seq, mode="process", workers=1, start_method="spawn")
        print(len(list(p)))
    """ % (os.path.dirname(os.path.abspath(__file__)), blob)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "bootstrapping phase" in r.stderr, r.stderr
    assert "can only join a started process" not in r.stderr, r.stderr
    assert "pyloader's zygote process is gone" in r.stderr, r.stderr


def test_spawn_pickles_the_sequence_once_and_the_zygote_loads_it():
    """spawn and forkserver send the Sequence pickled: once (by the check that it can be), not a
    second time by multiprocessing. A Sequence that fails to load in the new interpreter ends the
    zygote, and the Prefetcher's construction says so."""
    run_ok("""
    from sequences import CountedPickles
    for method in ("spawn", "forkserver"):
        CountedPickles.pickles = 0
        with pyloader.Prefetcher(CountedPickles(6), mode="process", workers=2, start_method=method) as p:
            assert [int(b[1]) for b in p] == list(range(6))
            assert [int(b[1]) for b in p] == list(range(6))
            assert CountedPickles.pickles == 1, (method, CountedPickles.pickles)
    try:
        pyloader.Prefetcher(CountedPickles(6, unloadable=True), mode="process", workers=1, start_method="spawn")
    except RuntimeError as e:
        assert "zygote process is gone" in str(e) and "exited with status 1" in str(e), str(e)
    else:
        raise AssertionError("no RuntimeError")
    import multiprocessing
    assert multiprocessing.active_children() == []  # every zygote joined (not counting the
    print("OK")                                     # forkserver and resource tracker, which stay)
    """)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawn_and_forkserver_load_every_batch(method):
    run_ok(f"""
    seq = ProcSeq(20, shape=(100, 100), crash_at=(4,), crash_epoch=0)
    with pyloader.Prefetcher(seq, mode="process", workers=2, start_method={method!r}, max_retries=0) as p:
        got = []
        it = iter(p)
        while True:
            try:
                got.append(next(it)[1])
            except pyloader.WorkerDiedError as e:
                assert e.index == 4
                got.append(None)
            except StopIteration:
                break
        assert got == [None if i == 4 else i for i in range(20)], got
        assert [b[2]["epoch"] for b in p] == [1] * 20
    print("OK")
    """)


def test_options_are_validated():
    from sequences import ProcSeq

    import pyloader

    with pytest.raises(ValueError, match="start_method must be one of"):
        pyloader.Prefetcher(ProcSeq(2), mode="process", start_method="vfork")
    with pytest.raises(ValueError, match=r"apply to mode='process' \(or 'auto'\) only"):
        pyloader.Prefetcher(ProcSeq(2), mode="thread", start_method="spawn")
    # mode="auto" (the default) may move to processes: it takes them, for then.
    pyloader.Prefetcher(ProcSeq(2), start_method="spawn", worker_init_fn=print).close()
    with pytest.raises(ValueError, match="worker_init_fn must be callable"):
        pyloader.Prefetcher(ProcSeq(2), mode="process", worker_init_fn=3)
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0"):
        pyloader.Prefetcher(ProcSeq(2), mode="process", max_retries=-1)
    assert pyloader.Prefetcher(ProcSeq(2)).worker_pids() == []


def test_ctrl_c_to_the_process_group_leaves_nothing():
    # A terminal's Ctrl-C signals the whole process group: the workers and the zygote ignore it,
    # the consumer gets KeyboardInterrupt while waiting, and its exit takes them all down.
    proc, pids = start_consumer(0.2, """
        try:
            for _ in it:
                pass
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            assert all(psutil.pid_exists(pid) for pid in p.worker_pids())  # they ignored it
            raise
        """, start_new_session=True)
    try:
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert "interrupted" in out, err
        assert "KeyboardInterrupt" in err, err
        assert wait_gone(pids) == []
    finally:
        proc.kill()
        proc.communicate()


def test_array_sequence_is_gathered_natively_in_process_mode():
    import numpy as np

    import pyloader

    def first(mode: str) -> list[float]:
        a = pyloader.ArraySequence(np.arange(24, dtype=np.float32), batch_size=4, shuffle=True, seed=1)
        with pyloader.Prefetcher(a, mode=mode, workers=2) as p:
            p.set_epoch(3)
            assert p.worker_pids() == []
            return next(iter(p)).tolist()

    assert first("process") == first("thread")


def test_abandoned_passes_leave_no_worker_traceback():
    """Abandoning a pass (a new iter() or set_epoch() mid-epoch) replaces the workers left
    mid-conversation by closing their sockets with a message unread: the worker gets
    ConnectionResetError and must exit quietly (issue 14, item 11), not print a traceback."""
    r = run_python(PRELUDE + textwrap.dedent("""
    seq = ProcSeq(40, shape=(1 << 14,), sleep=0.002)
    with pyloader.Prefetcher(seq, workers=2, mode="process", depth=8) as loader:
        for trial in range(6):
            it = iter(loader)
            next(it), next(it)
            loader.set_epoch(trial + 3)
            next(iter(loader))
            next(iter(loader))  # abandons the pass before
        assert [int(b[1]) for b in loader] == list(range(40))
    print("OK")
    """), timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
