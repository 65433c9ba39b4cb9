"""Shutdown and blocking: close, garbage collection, interpreter exit, Ctrl-C, held leases.

Everything that could hang runs in a subprocess with a timeout, so that a hang fails one test.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

import pyloader
from sequences import Counting


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_no_native_thread_survives_close():
    before = native_threads()
    loader = pyloader.Prefetcher(Counting(100), workers=6, depth=3)
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
