"""``model.fit`` fed by Keras's own workers or by pyloader, one epoch at a time (benchmark helpers).

:class:`FitRun` wraps a plain ``(x, y)`` Sequence in a user's ``PyDataset`` with Keras's thread or
process pool, or passes that PyDataset through :func:`pyloader.keras.prefetch`, and runs one
``fit`` epoch per call on a small model, so that both the ``fit-*`` loaders of
``python -m pyloader bench`` (timing from outside) and ``bench/keras_fit.py``
(:func:`fit_epoch_times`, timing inside ``fit``) compare the same thing. It imports Keras: import
it only where Keras is wanted.
"""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np

from ..keras import PrefetchedDataset, prefetch

__all__ = ["FIT_LOADERS", "FitRun", "fit_epoch_times"]

FIT_LOADERS = ("keras-threads", "keras-processes", "pyloader")
"""How :class:`FitRun` and :func:`fit_epoch_times` can feed ``model.fit``: the user's PyDataset
with Keras's thread pool, with Keras's process pool (``use_multiprocessing=True``), or through
:func:`pyloader.keras.prefetch`."""


class _UserDataset(keras.utils.PyDataset):
    """A user's PyDataset over a plain Sequence, with Keras's parallelism settings (benchmark)."""

    def __init__(self, sequence: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sequence = sequence

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, index: int) -> Any:
        return self.sequence[index]


def _small_model(batch: Any) -> keras.Model:
    """Flatten -> Dense(1), sized from one ``(x, y)`` batch, compiled with SGD and MSE."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    model = keras.Sequential([keras.Input(np.shape(x)[1:]), keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-9), "mse")
    return model


class FitRun:
    """One way of feeding ``model.fit`` on a Sequence, run one epoch at a time (benchmark helper).

    Each :meth:`epoch` is one ``model.fit(..., initial_epoch=k, epochs=k + 1)`` call with ``fit``'s
    defaults (``shuffle=True``) and ``verbose=0``, so a caller can time epochs from outside (the
    ``fit-*`` loaders of ``python -m pyloader bench``) or from inside (:func:`fit_epoch_times`).
    Keras starts and stops its enqueuer at every epoch whether or not the epochs share one ``fit``
    call; pyloader's dataset lives across calls, so it keeps loading ahead from one to the next.

    Args:
        sequence: ``__len__``/``__getitem__`` returning ``(x, y)`` batches (numpy).
        loader: one of :data:`FIT_LOADERS`.
        workers: Keras's ``workers``, or pyloader's.
        model: a compiled model; default a ``Flatten -> Dense(1)`` sized from ``sequence[0]``.

    Raises:
        ValueError: ``loader`` is not one of :data:`FIT_LOADERS`, or ``workers < 1``.
    """

    def __init__(
        self, sequence: Any, *, loader: str, workers: int = 4, model: keras.Model | None = None
    ) -> None:
        if loader not in FIT_LOADERS:
            raise ValueError(f"loader must be one of {FIT_LOADERS}, got {loader!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.loader = loader
        self.workers = workers
        self.model = _small_model(sequence[0]) if model is None else model
        self.epochs = 0  # epochs run so far
        if loader == "pyloader":
            self.data: Any = prefetch(_UserDataset(sequence, workers=workers), workers=workers)
        else:
            self.data = _UserDataset(sequence, workers=workers,
                                     use_multiprocessing=loader == "keras-processes")

    def epoch(self) -> tuple[float, int]:
        """Runs one ``fit`` epoch.

        Returns:
            ``(seconds, batches)``: wall seconds from ``on_epoch_begin`` to ``on_epoch_end``, and
            the training steps ``fit`` ran (batches it consumed).
        """
        clock: dict[str, float] = {"batches": 0}

        class _Clock(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                clock["start"] = time.perf_counter()

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                clock["batches"] += 1

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                clock["seconds"] = time.perf_counter() - clock["start"]

        self.model.fit(self.data, initial_epoch=self.epochs, epochs=self.epochs + 1, verbose=0,
                       callbacks=[_Clock()])
        self.epochs += 1
        return clock["seconds"], int(clock["batches"])

    def stats(self) -> dict[str, Any] | None:
        """pyloader's :meth:`~pyloader.Prefetcher.stats` entry of the epoch that just ran (its
        ``stall_fraction`` near 0 means the model, not the data, set the pace), else None."""
        if not isinstance(self.data, PrefetchedDataset) or not self.epochs:
            return None
        # A fresh Prefetcher numbers epochs from 0; the latest entry may be the next epoch,
        # already loading.
        for entry in self.data.stats().get("epochs") or []:
            if entry.get("epoch") == self.epochs - 1:
                return dict(entry)
        return None

    def close(self) -> None:
        """Stops pyloader's workers (Keras stops its own at the end of every epoch). Idempotent."""
        if isinstance(self.data, PrefetchedDataset):
            self.data.close()

    def __repr__(self) -> str:
        return f"FitRun(loader={self.loader!r}, workers={self.workers}, epochs={self.epochs})"


def fit_epoch_times(
    sequence: Any,
    *,
    loader: str,
    workers: int = 4,
    epochs: int = 3,
    model: keras.Model | None = None,
    stats: list[dict[str, Any]] | None = None,
) -> list[float]:
    """Times ``model.fit`` epochs on ``sequence`` fed one way or another (benchmark entry point).

    Used by ``bench/keras_fit.py`` to compare pyloader with Keras's own workers inside a real
    ``fit`` (default ``shuffle=True``, ``verbose=0``); runs :class:`FitRun` ``epochs`` times.

    Args:
        sequence: ``__len__``/``__getitem__`` returning ``(x, y)`` batches (numpy).
        loader: one of :data:`FIT_LOADERS`.
        workers: Keras's ``workers``, or pyloader's.
        epochs: epochs to run; the first one includes warming up the model and starting workers.
        model: a compiled model; default a ``Flatten -> Dense(1)`` sized from ``sequence[0]``.
        stats: if given, pyloader's per-epoch :meth:`~pyloader.Prefetcher.stats` are appended
            to it (``stall_fraction`` near 0 means the model, not the data, set the pace).

    Returns:
        wall seconds of each epoch, from ``on_epoch_begin`` to ``on_epoch_end``.

    Raises:
        ValueError: ``loader`` is not one of :data:`FIT_LOADERS`.
    """
    run = FitRun(sequence, loader=loader, workers=workers, model=model)
    times: list[float] = []
    try:
        for _ in range(epochs):
            seconds, _batches = run.epoch()
            times.append(seconds)
            if stats is not None and (entry := run.stats()) is not None:
                stats.append(entry)
    finally:
        run.close()
    return times
