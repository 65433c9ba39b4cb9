"""Batches of samples: a per-sample dataset as a batch Sequence, collated natively in the workers.

:func:`batches` turns a map-style dataset (``len(dataset)`` samples, ``dataset[j]`` one sample)
into a Sequence of batches for a :class:`~pyloader.Prefetcher` (or :mod:`pyloader.jax`,
:mod:`pyloader.keras`, :mod:`pyloader.torch`'s ``prefetch``). Batch ``i`` of an epoch fetches its
samples on a worker and returns :func:`pyloader.stack` of them, so the worker collates them
straight into slot memory with the GIL released; a ``collate`` function runs in the worker
instead, when given.

The sample order of an epoch is a pure function of ``(seed, epoch)``: the permutation
:class:`~pyloader.ArraySequence` draws (``numpy.random.default_rng([seed, 1, epoch])``), so
``batches(x, n, shuffle=True, seed=s)`` and ``ArraySequence(x, batch_size=n, shuffle=True,
seed=s)`` give the same batches. The epoch is the Sequence's :attr:`Batches.epoch`, which
``on_epoch_end()`` advances: a Prefetcher calls it where loading crosses from one epoch to the
next (before the next epoch's first batch loads, in its worker processes too), so prefetching across
the boundary stays exact. To resume, set the epoch before the Prefetcher is made
(:meth:`Batches.set_epoch`, or :func:`pyloader.jax.prefetch`, whose ``load_state_dict`` does it).

``jax.Array`` leaves of a sample (or of what ``collate`` returns) become numpy arrays on the
worker (``numpy.asarray``), so that the native stack and the slot layout see arrays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _checks, _tree
from ._errors import add_note
from ._plan import SampleBatches
from .collate import collate as _collate_numpy
from .collate import stack

__all__ = ["Batches", "batches", "fetch_samples", "jax_to_numpy"]


def _holds_jax(tree: Any, array_type: type) -> bool:
    return any(isinstance(leaf, array_type) for leaf in _tree.leaves(tree))


def jax_to_numpy(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` leaf replaced by ``numpy.asarray`` of it (no copy where
    jax allows it, on CPU). The tree itself when jax is not imported or it holds no jax array.
    """
    jax = sys.modules.get("jax")
    array_type = getattr(jax, "Array", None)
    if array_type is None or not _holds_jax(tree, array_type):
        return tree
    return _tree.map_structure(lambda x: np.asarray(x) if isinstance(x, array_type) else x, tree)


def fetch_samples(dataset: Any, getitems: Callable[[list[Any]], Any] | None, indices: list[Any],
                  failed: Callable[[Any, BaseException], None]) -> list[Any]:
    """The samples of one batch, as torch's fetcher gets them: ``getitems(indices)`` when given
    (``dataset.__getitems__``), else ``dataset[j]`` for each ``j``.

    The one fetch of every sample batcher (:class:`Batches`; ``pyloader.torch``'s batches).

    Args:
        dataset: the per-sample dataset.
        getitems: ``dataset.__getitems__``, or None to index sample by sample.
        indices: the batch's dataset indices.
        failed: called as ``failed(j, exc)`` inside the ``except`` of a sample ``j`` that raised
            ``exc`` (``j`` None: ``getitems`` raised); it raises the error the caller wants, or
            returns to re-raise ``exc`` itself.
    """
    if getitems is not None:
        try:
            return getitems(indices)
        except Exception as exc:
            failed(None, exc)
            raise
    samples = []
    j = None
    try:
        for j in indices:
            samples.append(dataset[j])
    except Exception as exc:
        failed(j, exc)
        raise
    return samples


class Batches(SampleBatches):
    """A per-sample dataset as a Sequence of batches, collated natively by a Prefetcher's workers.

    A Batches is a Sequence: ``len()`` batches, ``[i]`` batch ``i``. ``pyloader.batches`` is this
    class, under the name the README uses.

    Example::

        import numpy as np
        import pyloader

        class Squares:
            def __len__(self):
                return 100

            def __getitem__(self, j):
                return {"x": np.full(3, j, np.float32), "y": j * j}

        seq = pyloader.batches(Squares(), 32, shuffle=True, seed=0, drop_last=True)
        with pyloader.Prefetcher(seq, workers=2) as loader:
            for epoch in range(2):
                for batch in loader:
                    assert batch["x"].shape == (32, 3) and batch["y"].dtype == np.int64

    Args:
        dataset: ``len(dataset)`` samples, ``dataset[j]`` sample ``j`` (a numpy array, a number,
            or a tuple/list/dict of them); ``dataset.__getitems__(indices)``, when it exists,
            fetches a batch's samples in one call (as torch's fetcher does).
        batch_size: samples per batch.
        shuffle: permute the samples every epoch, from ``(seed, epoch)``.
        seed: the seed of the permutations; ``None`` draws one (:attr:`Batches.seed`). Give one
            when several processes must agree (multi-host JAX).
        drop_last: drop the last batch when it has fewer than ``batch_size`` samples.
        collate: a function of the list of a batch's samples that returns the batch, run in the
            worker; ``None``: :func:`pyloader.stack` (``default_collate``'s rules, into slot memory).

    Raises:
        TypeError: ``dataset`` has no ``__len__`` or ``__getitem__``.
        ValueError: a bad option (the message shows it).

    Attributes:
        dataset: the per-sample dataset.
        batch_size: samples per batch.
        shuffle: whether each epoch permutes the samples, from ``(seed, epoch)``.
        seed: the seed of the permutations (drawn when ``None`` was given).
        drop_last: whether the last, partial batch is dropped.
        collate: the function that makes a batch of a list of samples in the worker, or None
            (the native stack).
        epoch: the epoch whose sample order ``self[i]`` follows.
        samples: ``len(dataset)``, read when the Batches was made.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"dataset must have __len__ (number of samples) and __getitem__ (one sample), "
                f"got {type(dataset).__name__}"
            )
        super().__init__(batch_size, shuffle, seed, drop_last)
        if collate is not None and not callable(collate):
            raise ValueError(f"collate must be callable or None, got {collate!r}")
        samples = len(dataset)
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
            raise TypeError(f"len(dataset) must be an integer >= 0, got {samples!r}")
        self.samples = int(samples)
        self.dataset = dataset
        self.collate = collate
        getitems = getattr(dataset, "__getitems__", None)
        self._getitems = getitems if callable(getitems) else None
        # The latest epochs' sample orders, drawn once per epoch (not once per batch). Workers may
        # draw one twice at an epoch's start (same result); pruning reads a snapshot of the keys.
        self._orders: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_orders"] = {}  # recomputed where needed: pickled to worker processes without them
        return state

    def batch_indices(self, index: int, epoch: int) -> list[int]:
        """The dataset indices of batch ``index`` in ``epoch``."""
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.samples)
        if not self.shuffle:
            return list(range(start, stop))
        order = self._orders.get(epoch)
        if order is None:
            order = self.sample_order(epoch)
            assert order is not None, "shuffled"
            self._orders[epoch] = order
            for old in list(self._orders):  # list(): one step under the GIL
                if not epoch - 2 <= old <= epoch + 2:
                    self._orders.pop(old, None)
        return order[start:stop].tolist()

    def samples_of(self, index: int) -> list[Any]:
        """The samples of batch ``index`` of the current :attr:`epoch`, as the dataset returns
        them (``jax.Array`` leaves as numpy arrays).

        Raises:
            IndexError: ``index`` is out of range.
            Exception: what ``dataset[j]`` (or ``__getitems__``) raised, with a note naming the
                sample ``j``, the batch and the epoch.
        """
        i = self.batch_index(index)
        epoch = self.epoch
        indices = self.batch_indices(i, epoch)

        def failed(j: Any, exc: BaseException) -> None:
            if j is None:
                add_note(exc, f"in dataset.__getitems__({indices}) for batch {i} of epoch {epoch}")
            else:
                add_note(exc, f"in dataset[{j}], sample {indices.index(j)} of batch {i} (epoch {epoch})")

        samples = list(fetch_samples(self.dataset, self._getitems, indices, failed))
        if len(samples) != len(indices):
            raise ValueError(
                f"dataset.__getitems__ returned {len(samples)} samples for the {len(indices)} "
                f"indices of batch {i} (epoch {epoch})"
            )
        return [jax_to_numpy(s) for s in samples]

    def __getitem__(self, index: int) -> Any:
        """Batch ``index``: for a Prefetcher's worker, :func:`pyloader.stack` of its samples (the
        worker collates them into slot memory), or what ``collate`` made of them.

        Outside a Prefetcher use :meth:`load`, which collates in numpy.
        """
        samples = self.samples_of(index)
        if self.collate is None:
            return stack(samples)
        return jax_to_numpy(self.collate(samples))

    def load(self, index: int) -> Any:
        """Batch ``index`` collated here, in plain numpy (:func:`pyloader.collate`, or ``collate``),
        for use outside a Prefetcher; equal to what a Prefetcher delivers for it."""
        samples = self.samples_of(index)
        if self.collate is None:
            return _collate_numpy(samples)
        return jax_to_numpy(self.collate(samples))

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose sample order the batches follow (before a Prefetcher is made over
        this Sequence, to resume at ``epoch``)."""
        self.epoch = _checks.whole("epoch", epoch, 0)

    def on_epoch_end(self) -> None:
        """Advances the epoch (a Prefetcher calls this where loading crosses epochs)."""
        self.epoch += 1

    def __repr__(self) -> str:
        return (
            f"Batches({type(self.dataset).__name__} of {self.samples} samples, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, epoch={self.epoch}"
            + ("" if self.collate is None else f", collate={self.collate!r}") + ")"
        )


batches = Batches  # pyloader.batches(dataset, batch_size, ...): the name the README uses
