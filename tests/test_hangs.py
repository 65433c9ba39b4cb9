"""Hangs that must end (issue 14, items 3-5): a stuck ``__getitem__``, a stopped worker process,
a timed-out batch, a pool whose every buffer the user keeps.

Every scenario runs in a fresh interpreter with a timeout (conftest.run_python): before the fixes,
each of them hung (or, for the stall warning, waited without a word). The knobs that make the waits
short are the Prefetcher's documented class attributes (``close_grace_s``, ``stall_warning_s``,
``pool_wait_s``), set on the instance.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads and processes in /proc")

PRELUDE = """
import os, signal, sys, threading, time, warnings
import numpy as np
import pyloader
from sequences import Counting


def stall_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, pyloader.StallWarning)]
"""

HANG_S = 90.0  # a scenario that runs this long hung


def run_ok(body: str, *, timeout: float = HANG_S) -> subprocess.CompletedProcess[str]:
    r = run_python(PRELUDE + textwrap.dedent(body), timeout=timeout)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for crash in ("terminate called", "Fatal Python error", "Segmentation fault", "Aborted"):
        assert crash not in r.stderr, r.stderr
    return r


MODES = ["thread", "process"]

# ---- item 3: close() after a timeout, with a __getitem__ that never returns -------------------


@pytest.mark.parametrize("stuck", ["forever", "returns_during_finalization"])
def test_timeout_inside_with_reaches_the_user_and_close_abandons_the_stuck_thread(stuck):
    # Before: the TimeoutError was raised, then __exit__'s close() joined the stuck thread forever.
    # "returns_during_finalization": the abandoned thread's call returns while the interpreter
    # finalizes (an object that only a module holds keeps the teardown of modules busy
    # meanwhile): CPython ends the thread when it asks for the GIL, and the process still exits
    # cleanly with status 0.
    r = run_ok("""
    import types
    stuck = %r

    class SlowFinalization:
        def __del__(self, sleep=time.sleep, finalizing=sys.is_finalizing, write=os.write):
            write(2, b"finalizing: %%d\\n" %% finalizing())
            sleep(4.0)  # the abandoned thread's call returns meanwhile

    if stuck != "forever":
        # Not a global of __main__: with a thread still alive CPython does not tear __main__ down.
        sys.modules["slow_finalization"] = types.ModuleType("slow_finalization")
        sys.modules["slow_finalization"].obj = SlowFinalization()

    class Stuck:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 2:
                if stuck == "forever":
                    threading.Event().wait()
                time.sleep(3.0)
            return np.full(4, i)

    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        try:
            with pyloader.Prefetcher(Stuck(), workers=2, depth=2, timeout=0.5) as p:
                p.close_grace_s = 0.3
                it = iter(p)
                assert [int(next(it)[0]) for _ in range(2)] == [0, 1]
                next(it)
        except TimeoutError as exc:
            assert "batch 2 (epoch 0) was not loaded within timeout=0.5" in str(exc), exc
        else:
            raise AssertionError("no TimeoutError")
    abandoned = stall_warnings(caught)
    assert len(abandoned) == 1, abandoned
    assert "abandoned worker thread" in abandoned[0] and "__getitem__(2)" in abandoned[0], abandoned
    assert "epoch 0" in abandoned[0], abandoned
    print("OK", flush=True)
    """ % stuck)
    if stuck != "forever":
        assert "finalizing: 1" in r.stderr, r.stderr


def test_an_abandoned_thread_that_returns_later_ends_cleanly():
    # The thread holds its engine: once its call returns it ends, and the last reference it drops
    # destroys the engine and the loader on that thread.
    run_ok("""
    class Slow(Counting):
        def __getitem__(self, i):
            if i == 1:
                time.sleep(1.5)
            return super().__getitem__(i)

    before = len(os.listdir("/proc/self/task"))
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        p = pyloader.Prefetcher(Slow(10), workers=2, depth=2)
        p.close_grace_s = 0.2
        it = iter(p)
        next(it)
        time.sleep(0.3)  # batch 1 is inside __getitem__ now
        p.close()
    abandoned = stall_warnings(caught)
    assert len(abandoned) == 1 and "__getitem__(1)" in abandoned[0], abandoned
    deadline = time.monotonic() + 30
    while len(os.listdir("/proc/self/task")) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/task")) == before, (before, os.listdir("/proc/self/task"))
    print("OK")
    """)


def test_close_in_process_mode_kills_the_stuck_worker_and_leaves_no_process():
    run_ok("""
    import psutil

    class Hang:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 2:
                time.sleep(3600)
            return np.full(4, i)

    try:
        with pyloader.Prefetcher(Hang(), mode="process", workers=2, timeout=0.5) as p:
            it = iter(p)
            assert [int(next(it)[0]) for _ in range(2)] == [0, 1]
            next(it)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no TimeoutError")
    deadline = time.monotonic() + 10
    while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert psutil.Process().children(recursive=True) == [], psutil.Process().children(recursive=True)
    print("OK")
    """)


# ---- item 4: a stuck or stopped worker with timeout=None says so ------------------------------


def test_a_long_wait_warns_once_naming_the_batch_the_worker_and_the_time():
    run_ok("""
    class SlowThree(Counting):
        def __getitem__(self, i):
            if i == 3:
                time.sleep(2.0)
            return super().__getitem__(i)

    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        with pyloader.Prefetcher(SlowThree(8), workers=2, depth=2) as p:
            p.stall_warning_s = 0.3
            got = [int(b[1]["i"]) for b in p]
    assert got == list(range(8)), got
    stalls = stall_warnings(caught)
    assert len(stalls) == 1, stalls
    message = stalls[0]
    assert "batch 3 (epoch 0)" in message and "worker thread" in message, message
    assert "__getitem__(3)" in message and "timeout=None" in message, message
    print("OK")
    """)


def test_a_stopped_worker_process_is_named_with_its_pid_and_state():
    # Before: SIGSTOP on a worker with timeout=None hung without a word.
    run_ok("""
    warnings.simplefilter("error", RuntimeWarning)  # the stall warning ends next() as an error
    with pyloader.Prefetcher(Counting(12), mode="process", workers=1, depth=2) as p:
        p.stall_warning_s = 0.5
        it = iter(p)
        got = [int(next(it)[1]["i"])]
        (pid,) = p.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        messages = []
        while True:
            try:
                got.append(int(next(it)[1]["i"]))
            except StopIteration:
                break
            except RuntimeWarning as w:
                messages.append(str(w))
                os.kill(pid, signal.SIGCONT)
    assert got == list(range(12)), got  # the warning lost nothing: next() waited on
    assert len(messages) == 1, messages
    assert "worker process %d" % pid in messages[0] and "stopped" in messages[0], messages
    print("OK")
    """)


# ---- item 4: after a TimeoutError the position is abandoned and the loader goes on ------------


def test_a_stopped_worker_process_is_killed_and_replaced_after_a_timeout():
    run_ok("""
    with pyloader.Prefetcher(Counting(10), mode="process", workers=1, depth=2, timeout=1.0) as p:
        it = iter(p)
        got = [int(next(it)[1]["i"])]
        (pid,) = p.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        lost = []
        while True:
            try:
                got.append(int(next(it)[1]["i"]))
            except StopIteration:
                break
            except TimeoutError as exc:
                lost.append(exc)
        assert len(lost) == 1, lost
        lost_index = int(str(lost[0]).split("batch ")[1].split()[0])
        assert sorted(got + [lost_index]) == list(range(10)), (got, lost_index)  # nothing twice
        (new_pid,) = p.worker_pids()
        assert new_pid != pid
        deadline = time.monotonic() + 10
        while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists("/proc/%d" % pid), "the stopped worker was not killed"
    print("OK")
    """)

STUCK_ONCE = """
    class StuckOnce:
        # The first load of index 2 never returns (in process mode: the first worker to load it).
        def __init__(self, n, marker):
            self.n = n
            self.marker = marker

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if i == 2:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    while True:
                        time.sleep(3600)
            return np.full(4, i), {"i": i}


    def indices(batches):
        return [int(b[1]["i"]) for b in batches]
"""


@pytest.mark.parametrize("mode", MODES)
def test_after_a_timeout_next_goes_on_with_the_following_batch(mode, tmp_path):
    # Before: next() waited for the stuck batch again (another TimeoutError, forever).
    run_ok(STUCK_ONCE + """
    marker = %r
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        p = pyloader.Prefetcher(StuckOnce(8, marker), workers=2, depth=2, timeout=1.0, mode=%r)
        p.close_grace_s = 0.2
        it = iter(p)
        got = indices([next(it), next(it)])
        try:
            next(it)
        except TimeoutError as exc:
            assert "batch 2 (epoch 0)" in str(exc), exc
        else:
            raise AssertionError("no TimeoutError")
        assert p.state_dict()["batches_consumed"] == 3  # the timed-out batch counts as passed
        got += indices(it)
        assert got == [0, 1, 3, 4, 5, 6, 7], got  # batch 2 abandoned, nothing twice, nothing lost
        assert indices(p) == list(range(8))  # the next epoch is whole
        if p.mode == "process":
            stuck = int(open(marker).read())
            assert stuck not in p.worker_pids() and len(p.worker_pids()) == 2, (stuck, p.worker_pids())
            deadline = time.monotonic() + 10
            while os.path.exists("/proc/%%d" %% stuck) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists("/proc/%%d" %% stuck), "the stuck worker was not killed"
        p.close()
    if p.mode == "thread":
        abandoned = stall_warnings(caught)
        assert len(abandoned) == 1 and "__getitem__(2)" in abandoned[0], abandoned
    print("OK")
    """ % (str(tmp_path / "stuck"), mode))


@pytest.mark.parametrize("mode", MODES)
def test_a_new_iter_after_a_timeout_starts_the_next_epoch_at_once(mode, tmp_path):
    # Before: iter() drained the unfinished epoch and waited for the stuck batch forever.
    run_ok(STUCK_ONCE + """
    warnings.simplefilter("ignore", pyloader.StallWarning)
    with pyloader.Prefetcher(StuckOnce(6, %r), workers=2, depth=2, timeout=1.0, mode=%r) as p:
        p.close_grace_s = 0.2
        it = iter(p)
        assert indices([next(it), next(it)]) == [0, 1]
        try:
            next(it)
        except TimeoutError:
            pass
        else:
            raise AssertionError("no TimeoutError")
        assert indices(p) == list(range(6))
        assert p.epoch == 2
    print("OK")
    """ % (str(tmp_path / "stuck"), mode))


def test_set_epoch_after_a_timeout_gives_that_epoch_whole(tmp_path):
    run_ok(STUCK_ONCE + """
    warnings.simplefilter("ignore", pyloader.StallWarning)
    with pyloader.Prefetcher(StuckOnce(6, %r), workers=2, depth=2, timeout=1.0) as p:
        p.close_grace_s = 0.2
        it = iter(p)
        assert indices([next(it), next(it)]) == [0, 1]
        try:
            next(it)
        except TimeoutError:
            pass
        else:
            raise AssertionError("no TimeoutError")
        p.set_epoch(0)
        assert indices(p) == list(range(6))  # a fresh pass: not the rest of the abandoned one
    print("OK")
    """ % str(tmp_path / "stuck"))


@pytest.mark.parametrize("mode", MODES)
def test_a_new_iter_after_a_break_does_not_wait_for_ever_for_a_stuck_batch(mode, tmp_path):
    # The pass is left (break) while batch 2 is stuck in __getitem__: skipping the rest of the
    # epoch waits for it at most `timeout`, then gives the rest up and goes on. Before: for ever.
    run_ok(STUCK_ONCE + """
    marker = %r
    warnings.simplefilter("ignore", pyloader.StallWarning)
    with pyloader.Prefetcher(StuckOnce(6, marker), workers=2, depth=2, timeout=1.0, mode=%r) as p:
        p.close_grace_s = 0.2
        for batch in p:
            if int(batch[1]["i"]) == 1:
                break
        deadline = time.monotonic() + 30
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(marker), "batch 2 never started loading"
        assert indices(p) == list(range(6))
        assert p.epoch == 2
    print("OK")
    """ % (str(tmp_path / "stuck"), mode))


def test_a_timeout_on_the_last_batch_ends_the_pass_and_runs_on_epoch_end(tmp_path):
    run_ok(STUCK_ONCE + """
    class WithHook(StuckOnce):
        ends = 0

        def on_epoch_end(self):
            WithHook.ends += 1

    warnings.simplefilter("ignore", pyloader.StallWarning)
    with pyloader.Prefetcher(WithHook(3, %r), workers=1, depth=1, timeout=0.5) as p:
        p.close_grace_s = 0.2
        it = iter(p)
        assert indices([next(it), next(it)]) == [0, 1]
        try:
            next(it)
        except TimeoutError:
            pass
        else:
            raise AssertionError("no TimeoutError")
        assert list(it) == []
        assert WithHook.ends == 1, WithHook.ends
        assert indices(p) == [0, 1, 2]
        assert WithHook.ends == 2, WithHook.ends
    print("OK")
    """ % str(tmp_path / "stuck"))


# ---- item 5: every buffer held by the user -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_keeping_every_batch_past_the_bound_raises_and_names_the_bound(mode):
    # Before: a PoolExhaustedWarning, then a wait forever.
    run_ok("""
    kept = []
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        p = pyloader.Prefetcher(Counting(40), workers=2, depth=2, max_pool_bytes=3 * 4096, mode=%r)
        p.pool_wait_s = 1.0
        it = iter(p)
        try:
            while True:
                kept.append(next(it))
        except pyloader.PoolExhaustedError as exc:
            message = str(exc)
            assert isinstance(exc, MemoryError)
    assert any(issubclass(w.category, pyloader.PoolExhaustedWarning) for w in caught), caught
    held = len(kept)
    assert held in (3, 4), held
    assert "max_pool_bytes=12288" in message and "%%d batches" %% held in message, message
    assert "max_pool_bytes=" in message.split("raise")[-1], message  # says how to raise it
    kept.clear()  # released: the loader goes on where it stopped, nothing lost
    rest = [int(b[1]["i"]) for b in it]
    assert rest == list(range(held, 40)), rest
    p.close()
    print("OK")
    """ % mode)


def test_a_pool_that_another_thread_keeps_releasing_never_raises():
    run_ok("""
    import queue
    q = queue.Queue()

    def release_slowly():
        while q.get() is not None:
            time.sleep(0.05)

    t = threading.Thread(target=release_slowly)
    t.start()
    with pyloader.Prefetcher(Counting(60), workers=2, depth=2, max_pool_bytes=3 * 4096) as p:
        p.pool_wait_s = 5.0
        got = []
        for b in p:
            got.append(int(b[1]["i"]))
            q.put(b)
            del b
    q.put(None)
    t.join()
    assert got == list(range(60)), got
    print("OK")
    """)
