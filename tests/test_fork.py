"""The user's own os.fork() while loaders run: the child must neither hurt the parent's loaders nor
crash at its exit (issue 14, item 2). Each scenario runs in a fresh interpreter with a timeout.

What a forked child holds is a copy of the parent's loaders: their threads are not there, and their
shared memory, sockets and stop eventfd are the parent's. The child orphans them (never uses or
closes them); at its exit their native parts are destroyed touching nothing of the parent's
(csrc/core/fork.h).
"""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, and process mode uses /proc")

PRELUDE = """
import os, sys
import numpy as np
import pyloader

class Seq:
    def __len__(self):
        return 8

    def __getitem__(self, i):
        s = 0
        for k in range(2000):  # holds the GIL a while: the workers are busy at the fork
            s += k
        return np.full(1 << 16, i, np.int64)  # 512 KiB: in the shared arena in process mode

def firsts(batches):
    return [int(b[0]) for b in batches]

def fork_and_exit(child_body, how):
    pid = os.fork()
    if pid == 0:
        try:
            child_body()
        finally:
            os._exit(0) if how == "os._exit" else sys.exit(0)  # sys.exit runs every atexit handler
    _, status = os.waitpid(pid, 0)
    return status
"""


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("how", ["sys.exit", "os._exit"])
@pytest.mark.parametrize("child_loads", [False, True], ids=["idle_child", "child_with_own_loaders"])
def test_forked_child_neither_hurts_the_parents_loader_nor_crashes(mode, how, child_loads):
    r = run_python(PRELUDE + textwrap.dedent(f"""
    parent = pyloader.Prefetcher(Seq(), workers=2, mode={mode!r})
    it = iter(parent)
    held = next(it)  # kept across the fork: its memory must stay the parent's batch 0

    def child():
        if {child_loads!r}:
            for child_mode in ("thread", "process"):
                with pyloader.Prefetcher(Seq(), workers=2, mode=child_mode) as mine:
                    assert firsts(mine) == list(range(8)), child_mode
            open_one = pyloader.Prefetcher(Seq(), workers=2)  # left for exit to close
            next(iter(open_one))
            print("child loaded", flush=True)

    status = fork_and_exit(child, {how!r})
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child ended with status {{status}}"
    assert firsts(it) == list(range(1, 8))
    assert (held == 0).all(), "the child's exit freed the parent's batch memory"
    for _ in range(2):
        assert firsts(parent) == list(range(8))
    parent.close()
    print("OK")
    """), timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert ("child loaded" in r.stdout) == child_loads
    # nothing printed by the child's exit: no "Exception ignored in atexit callback", no abort
    assert "Exception ignored" not in r.stderr and "terminate called" not in r.stderr, r.stderr
