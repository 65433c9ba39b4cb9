"""Shutdown and blocking: close, garbage collection, interpreter exit, Ctrl-C, held leases.

Everything that could hang runs in a subprocess with a timeout, so that a hang fails one test.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
from sequences import Counting

import pyloader


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_no_native_thread_survives_close():
    before = native_threads()
    loader = pyloader.Prefetcher(Counting(100), workers=6, depth=6)
    it = iter(loader)
    next(it)
    assert native_threads() >= before + 6
    loader.close()
    assert native_threads() == before


def test_garbage_collecting_a_live_loader_stops_its_threads(python_subprocess):
    r = python_subprocess(
        """
        import gc, os, sys
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting
        before = len(os.listdir("/proc/self/task"))
        loader = pyloader.Prefetcher(Counting(1000, sleep=0.001), workers=4)
        it = iter(loader)
        next(it)
        del it, loader
        gc.collect()
        print("threads", len(os.listdir("/proc/self/task")) - before)
        """ % os.path.dirname(__file__),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "threads 0" in r.stdout


@pytest.mark.parametrize("sleep", [0.0, 0.3])
def test_interpreter_exit_with_a_live_loader_does_not_hang(python_subprocess, sleep):
    r = python_subprocess(
        """
        import sys
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting
        loader = pyloader.Prefetcher(Counting(1000, sleep=%r), workers=4, depth=2)
        it = iter(loader)
        next(it)
        print("leaving")
        """ % (os.path.dirname(__file__), sleep),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "leaving" in r.stdout


def test_ctrl_c_while_waiting_raises_keyboard_interrupt_at_once(python_subprocess):
    r = python_subprocess(
        """
        import os, signal, sys, threading, time
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting
        loader = pyloader.Prefetcher(Counting(10, sleep=3.0), workers=1)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            next(iter(loader))
        except KeyboardInterrupt:
            print("interrupted after %%.2f s" %% (time.monotonic() - start))
        loader.close()
        """ % os.path.dirname(__file__),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    waited = float(r.stdout.split("interrupted after ")[1].split()[0])
    assert waited < 1.5, r.stdout  # the batch takes 3 s: the interrupt did not wait for it


def test_keeping_every_batch_with_depth_2_never_overwrites_or_deadlocks(python_subprocess):
    r = python_subprocess(
        """
        import sys
        import numpy as np
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting, batch_value
        kept = []
        with pyloader.Prefetcher(Counting(300), workers=4, depth=2) as loader:
            for _ in range(2):
                kept += list(loader)
            info = loader.memory_info()
        for k, (x, meta) in enumerate(kept):
            assert meta["i"] == k %% 300
            np.testing.assert_array_equal(x, batch_value(k %% 300))
        assert info["buffers"] >= 600, info
        print("ok", info["buffers"])
        """ % os.path.dirname(__file__),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_a_pool_at_its_bound_waits_and_says_why(python_subprocess):
    r = python_subprocess(
        """
        import sys, warnings
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting
        warnings.simplefilter("error")
        kept = []
        loader = pyloader.Prefetcher(Counting(50), workers=2, depth=2, max_pool_bytes=3 * 4096)
        try:
            for batch in loader:
                kept.append(batch)
        except pyloader.PoolExhaustedWarning as w:
            print("warned after", len(kept), ":", w)
        kept.clear()
        loader.close()
        """ % os.path.dirname(__file__),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # The bound is 3 buffers. The loop stops only when every buffer holds a batch it kept: after 3,
    # or after 4 when position 3 took the last buffer first (position 2, which the loop needs next,
    # then grows the pool by one rather than wait for a buffer that only comes back after it).
    match = re.search(r"warned after (\d+) : .* all (\d+) buffers", r.stdout)
    assert match, r.stdout
    kept, buffers = int(match.group(1)), int(match.group(2))
    assert kept == buffers and kept in (3, 4), r.stdout
    assert "still referenced" in r.stdout and "max_pool_bytes" in r.stdout


MODES = ["thread", "process"]


@pytest.mark.parametrize("mode", MODES)
def test_two_threads_iterating_one_loader_get_an_error_never_a_crash(python_subprocess, mode):
    # Issue 14: two threads calling next() on one epoch iterator crashed (both took one position).
    # The consumer role is guarded in every build: the thread that finds it taken is refused, and
    # every batch still comes out exactly once.
    r = python_subprocess(
        """
        import sys, threading, time
        sys.path.insert(0, %r)
        import pyloader
        from pyloader import _C
        from sequences import Counting
        n = 40
        loader = pyloader.Prefetcher(Counting(n, sleep=0.02), workers=2, depth=2, mode=%r)
        it = iter(loader)
        start = threading.Barrier(2)
        got, refused = [], []

        def consume():
            start.wait()
            while True:
                try:
                    got.append(int(next(it)[1]["i"]))
                except StopIteration:
                    return
                except RuntimeError as exc:
                    refused.append(exc)
                    time.sleep(0.001)

        threads = [threading.Thread(target=consume) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loader.close()
        assert sorted(got) == list(range(n)), got
        assert refused, "the two threads never asked at the same time"
        assert all(isinstance(e, _C.ConcurrentConsumerError) for e in refused), refused[:3]
        assert "two threads are iterating one pyloader loader at once" in str(refused[0]), refused[0]
        print("ok", len(refused))
        """ % (os.path.dirname(__file__), mode),
        timeout=120,
    )
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.startswith("ok"), r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_closing_from_another_thread_ends_a_waiting_next_with_an_error(python_subprocess, mode):
    # The waiting call keeps the consumer (and its engine) alive until it has seen the stop.
    r = python_subprocess(
        """
        import sys, threading
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting
        loader = pyloader.Prefetcher(Counting(10, sleep=2.0), workers=1, mode=%r)
        it = iter(loader)
        threading.Timer(0.3, loader.close).start()
        try:
            next(it)
        except RuntimeError as exc:
            print("raised:", exc)
        """ % (os.path.dirname(__file__), mode),
        timeout=60,
    )
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "raised: this pyloader engine was closed while waiting for a batch" in r.stdout, r.stdout


def assert_clean_exit(r) -> None:
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "leaving" in r.stdout, r.stdout
    for crash in ("terminate called", "Fatal Python error", "Segmentation fault", "Aborted"):
        assert crash not in r.stderr, r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_interpreter_exit_with_kept_batches_and_batches_pending_on_workers(python_subprocess, mode):
    # At exit, workers hold loaded batches (waiting for buffers, or inside __getitem__) whose Python
    # objects die on the workers' threads; one loader (opened by an atexit hook that runs after
    # pyloader's own) is still running when the interpreter finalizes.
    r = python_subprocess(
        """
        import atexit, sys
        sys.path.insert(0, %r)

        def opened_after_pyloader_closed_its_loaders():
            global late, late_kept
            late = pyloader.Prefetcher(Counting(1000, sleep=0.05), workers=3, depth=2)
            late_kept = [next(iter(late))]

        atexit.register(opened_after_pyloader_closed_its_loaders)  # runs after pyloader's hook

        import pyloader
        from sequences import Counting
        mode = %r
        # The pool at its bound and every buffer kept: workers hold batches, waiting for buffers.
        full = pyloader.Prefetcher(Counting(1000), workers=3, depth=4, max_pool_bytes=3 * 4096, mode=mode)
        it = iter(full)
        kept = [next(it) for _ in range(3)]
        # Workers inside __getitem__.
        slow = pyloader.Prefetcher(Counting(1000, sleep=0.2), workers=3, depth=2, mode=mode)
        slow_kept = [next(iter(slow))]
        print("leaving", flush=True)
        """ % (os.path.dirname(__file__), mode),
        timeout=60,
    )
    assert_clean_exit(r)


def test_interpreter_exit_while_a_loader_closed_on_its_own_worker_winds_down(python_subprocess):
    # A loader closed from one of its own workers (e.g. the last reference dropped by a garbage
    # collection there) cannot join its threads: they end on their own, and the last one destroys
    # the engine, its loader and their Python objects, racing the interpreter's exit.
    r = python_subprocess(
        """
        import sys
        sys.path.insert(0, %r)
        import pyloader
        from sequences import Counting

        class ClosesItself(Counting):
            def __getitem__(self, i):
                if i == 5:
                    loaders[0].close()  # on a worker thread
                return super().__getitem__(i)

        loaders = []
        loaders.append(pyloader.Prefetcher(ClosesItself(1000, sleep=0.05), workers=3, depth=2))
        kept = []
        try:
            for batch in loaders[0]:
                kept.append(batch)
        except RuntimeError as exc:
            print("closed:", exc)
        print("leaving", flush=True)
        """ % os.path.dirname(__file__),
        timeout=60,
    )
    assert_clean_exit(r)
    assert "closed: this pyloader engine" in r.stdout, r.stdout
