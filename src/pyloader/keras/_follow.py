"""How a :class:`~pyloader.keras.PrefetchedDataset` follows Keras's ``PyDatasetAdapter``: the
adapter's generator frames (one frame, one pass of Keras over the data), the spec read of
``get_tf_dataset``, and :class:`_KerasFeed`, the enqueuer the dataset gives the adapter on
tensorflow. These read Keras's internals by name (``py_dataset``, ``enqueuer``,
``get_tf_dataset``); where they change, the dataset falls back to reading ``dataset[i]`` calls,
which is correct but slower on tensorflow."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._dataset import PrefetchedDataset

_CALLER_DEPTH = 3  # frames searched for Keras's generator (a subclass's __getitem__ adds one)


def _keras_generator(frame: FrameType | None, dataset: Any) -> tuple[FrameType, Any] | None:
    """``(frame, adapter)`` of the Keras adapter generator iterating ``dataset`` that called us.

    Keras's ``PyDatasetAdapter`` reads the dataset from generator methods whose ``self`` is the
    adapter and whose ``self.py_dataset`` is the dataset; that generator's frame identifies one
    pass of Keras over the data. Searches ``frame`` and a few callers; None if none matches.
    """
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_flags & inspect.CO_GENERATOR:
            adapter = frame.f_locals.get("self")
            if getattr(adapter, "py_dataset", None) is dataset:
                return frame, adapter
        frame = frame.f_back
    return None


_TF_DATASET_METHOD = "get_tf_dataset"  # Keras's PyDatasetAdapter method that builds the tf.data pipeline


class _KerasFeed:
    """Keras's enqueuer protocol (``start``, ``stop``, ``is_running``, ``get``) over a
    :class:`~pyloader.keras.PrefetchedDataset`, for Keras's tensorflow path.

    Keras's ``PyDatasetAdapter.get_tf_dataset`` builds a ``tf.data`` pipeline on a generator. For a
    PyDataset without an enqueuer (a PrefetchedDataset tells Keras ``workers=1``) it adds
    ``prefetch(AUTOTUNE)``: a second queue on top of pyloader's, a tf.data thread that takes the
    GIL to read it, and tf.data's autotuning thread, which the iterator's destructor waits for
    (on tensorflow 2.21 up to its next wake-up, seconds after a long epoch: ``fit`` returned 3 to
    26 s late on the gather workload). For an enqueuer, Keras disables tf.data's prefetching,
    threading and autotuning, since the enqueuer loads ahead itself: so does pyloader. The
    dataset gives its adapter this feed as the enqueuer when ``get_tf_dataset`` reads
    ``num_batches`` (before the adapter looks at its enqueuer), and Keras then reads the batches
    from :meth:`get` in the same steps (``_standardize_batch``, the same count per epoch, an
    error raised through the generator): the batches, their order, the hooks and the errors are
    those of the generator path. ``start``/``stop`` (Keras's calls around each epoch) do nothing:
    pyloader's workers run across epochs.
    """

    def __init__(self, dataset: PrefetchedDataset) -> None:
        self._dataset = dataset

    def start(self) -> None:
        """Nothing to start: pyloader's workers already run."""

    def stop(self, drain_queue_and_join: bool = True) -> None:
        """Nothing to stop: pyloader loads across epochs (``close()`` the dataset to stop it)."""

    def is_running(self) -> bool:
        """Whether the dataset is open."""
        return self._dataset._loader is not None

    def get(self) -> Iterator[Any]:
        """The batches of the pass of the Keras generator that iterates this (its caller), one per
        step, for as long as Keras reads (it stops after ``num_batches``)."""
        caller = sys._getframe(1)  # the Keras generator that called next() on this one
        dataset = self._dataset
        while True:
            yield dataset._next_for(caller)

    def __repr__(self) -> str:
        return f"_KerasFeed({self._dataset!r})"


def _keras_spec_read(frame: FrameType | None, dataset: Any) -> Any:
    """The adapter whose ``get_tf_dataset`` reads ``dataset`` from ``frame`` (or a few callers) to
    learn the batches' spec (Keras reads its first ``NUM_BATCHES_FOR_TENSOR_SPEC`` batches, in a
    comprehension), else None."""
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == _TF_DATASET_METHOD:
            adapter = frame.f_locals.get("self")
            return adapter if getattr(adapter, "py_dataset", None) is dataset else None
        frame = frame.f_back
    return None
