"""Sequences used across the tests: small, deterministic, instrumented."""

from __future__ import annotations

import threading
import time

import numpy as np


def batch_value(index: int) -> np.ndarray:
    return np.full((3, 5), index, dtype=np.int64)


class Counting:
    """Batch i is (array full of i, {"i": i}); records every index loaded, thread-safely."""

    def __init__(self, n: int, *, sleep: float = 0.0, fail: frozenset[int] = frozenset()) -> None:
        self.n = n
        self.sleep = sleep
        self.fail = fail
        self.loaded: list[int] = []
        self.epoch_ends = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.sleep:
            time.sleep(self.sleep)
        if i in self.fail:
            raise ValueError(f"bad batch {i}")
        with self._lock:
            self.loaded.append(i)
        return batch_value(i), {"i": i}


class WithEpochEnd(Counting):
    """Records the order of loads and on_epoch_end calls in one log."""

    def __init__(self, n: int, **kw) -> None:
        super().__init__(n, **kw)
        self.log: list[object] = []

    def __getitem__(self, i: int):
        out = super().__getitem__(i)
        with self._lock:
            self.log.append(i)
        return out

    def on_epoch_end(self) -> None:
        with self._lock:
            self.epoch_ends += 1
            self.log.append("end")


def indices_of(batches) -> list[int]:
    return [int(b[1]["i"]) for b in batches]


class ProcSeq:
    """For process mode (module level, so that spawn can pickle it).

    Batch i is ``(float32 array of `shape` full of i, i, {"name": "b<i>", "epoch": epoch})`` where
    ``epoch`` counts this copy's on_epoch_end() calls. It can sleep per batch, raise at
    ``raise_at``, and kill its own process with SIGSEGV at ``crash_at`` (in ``crash_epoch``
    only, when given).
    """

    def __init__(self, n: int, *, shape: tuple[int, ...] = (4,), sleep: float = 0.0,
                 raise_at: tuple[int, ...] = (), crash_at: tuple[int, ...] = (),
                 crash_epoch: int | None = None) -> None:
        self.n = n
        self.shape = shape
        self.sleep = sleep
        self.raise_at = frozenset(raise_at)
        self.crash_at = frozenset(crash_at)
        self.crash_epoch = crash_epoch
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def __getitem__(self, i: int):
        import os
        import signal

        if self.sleep:
            time.sleep(self.sleep)
        if i in self.crash_at and (self.crash_epoch is None or self.epoch == self.crash_epoch):
            os.kill(os.getpid(), signal.SIGSEGV)
        if i in self.raise_at:
            raise ValueError(f"bad batch {i}")
        return np.full(self.shape, i, dtype=np.float32), i, {"name": f"b{i}", "epoch": self.epoch}


class CountedPickles(ProcSeq):
    """A ProcSeq that counts how often it is pickled in this process; with ``unloadable``, its
    unpickling fails (as a Sequence whose module the new interpreter cannot import would)."""

    pickles = 0

    def __init__(self, n: int, *, unloadable: bool = False) -> None:
        super().__init__(n)
        self.unloadable = unloadable

    def __getstate__(self) -> dict:
        type(self).pickles += 1
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        if state["unloadable"]:
            raise ImportError("this Sequence cannot be loaded here")
        self.__dict__.update(state)


def init_marker(worker_id: int) -> None:
    """A worker_init_fn: records the worker id and a draw from numpy's seeded global state."""
    import os

    os.environ["PYLOADER_TEST_WORKER"] = f"{worker_id}:{np.random.randint(1 << 30)}"


class WorkerFacts:
    """Batch i is what the worker that loads it knows: (i, its pid, its init marker, a draw)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        import os

        time.sleep(0.02)  # so that both workers get some
        return i, os.getpid(), os.environ.get("PYLOADER_TEST_WORKER", ""), int(np.random.randint(1 << 30))


class Points:
    """512 random 8-d points labelled by a random hyperplane: ``(x[i], y[i])`` per sample, in
    Python (holding the GIL, as worker processes are for). Needs torch."""

    def __init__(self) -> None:
        import torch

        self.gen = torch.Generator().manual_seed(0)  # drawn from: then the loader's shuffle
        self.x = torch.randn(512, 8, generator=self.gen)
        self.y = (self.x @ torch.randn(8, generator=self.gen) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def sgd_losses(loader_class, epochs: int = 6, **options) -> list[float]:
    """Trains a small MLP with SGD over :class:`Points` through ``loader_class(dataset,
    batch_size=32, shuffle=True, num_workers=2, generator=<the data's>, **options)``; returns the
    mean loss of each epoch."""
    import torch

    data = Points()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    loader = loader_class(data, batch_size=32, shuffle=True, num_workers=2,
                          generator=data.gen, **options)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        losses.append(total / len(data))
    return losses
