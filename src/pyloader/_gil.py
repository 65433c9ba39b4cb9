"""GilProbe: how much of the time the training loop waits for a batch the GIL is held.

Autotune (:mod:`pyloader._tune`) moves thread-mode workers to processes when the GIL caps
loading. While the loop waits for a batch (``waiting`` set by the epoch iterator, the GIL released
in the engine's wait), whoever holds the GIL is loading (a worker in ``__getitem__``) or another
thread of the user's. A daemon thread samples it: it sleeps ``interval_s`` (GIL released) and
times how late it gets the GIL back. A free GIL is taken at once; a held one only when its holder
drops it, which a thread running Python does after ``sys.getswitchinterval()`` (5 ms). A wake
later than :data:`LATE_SHARE` of the switch interval counts as "held". Samples taken while the loop
was not waiting (before or after the sleep) are not counted.

The share is an estimate (a sleep can wake late on a loaded machine, which reads as "held"), good
enough to tell a ``__getitem__`` that holds the GIL (held ~100% of the waits) from one that
releases it (numpy, I/O, sleeps: a few percent).
"""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["GilProbe"]

LATE_SHARE = 0.4  # of the switch interval: a wake this late found the GIL held
MIN_SAMPLES = 10  # fewer samples tell nothing


class GilProbe:
    """Samples the GIL while the loop waits for a batch; :meth:`take` returns the held share.

    Args:
        interval_s: the sleep between samples.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.waiting = False  # set by the consumer around its wait for a batch
        self._interval = interval_s
        self._late = max(0.001, LATE_SHARE * sys.getswitchinterval())
        self._held = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyloader-gil-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        clock, sleep, interval, stop = time.perf_counter, time.sleep, self._interval, self._stop
        while not stop.is_set():
            before = self.waiting
            t0 = clock()
            sleep(interval if before else 4 * interval)
            late = clock() - t0 - (interval if before else 4 * interval)
            if before and self.waiting:
                self._samples += 1
                if late > self._late:
                    self._held += 1

    def take(self) -> float | None:
        """The share of samples that found the GIL held since the last call (None: too few)."""
        held, samples = self._held, self._samples
        self._held = self._samples = 0
        return held / samples if samples >= MIN_SAMPLES else None

    def close(self) -> None:
        """Stops the sampling thread and joins it (it ends within one sleep). Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(1.0)

    def __repr__(self) -> str:
        return f"GilProbe({self._samples} samples, {self._held} held)"
