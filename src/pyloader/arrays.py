"""ArraySequence: batches of arrays in memory or in memory-mapped ``.npy`` files.

It is a Sequence in its own right (``ds[i]`` is batch ``i``, by numpy indexing), so it works in a
plain loop or anywhere a Sequence does. Inside a :class:`~pyloader.Prefetcher` the native core
gathers the rows straight into slot buffers on its threads, with no GIL and no Python per batch
(``csrc/core/gather.h``); both paths give the same batches.

``shuffle=True`` shuffles *samples* (not just batch order) every epoch from ``(seed, epoch)``:
every sample once per epoch. The epoch comes from the Prefetcher (exact across prefetching over
epoch boundaries and resuming from a state_dict); in a plain loop it is :attr:`ArraySequence.epoch`,
which ``on_epoch_end()`` advances and :meth:`ArraySequence.set_epoch` sets.

No copy of the data is ever made: arrays are used in place, ``.npy`` files are memory-mapped
(data larger than RAM streams through the page cache). Each row must be contiguous in memory
(rows themselves may be strided, e.g. ``x[::2]``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from os import PathLike
from typing import Any, cast

import numpy as np

from . import _C, _checks
from ._plan import SampleBatches

__all__ = ["ArraySequence"]


def _check_array(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(
            f"ArraySequence takes numpy arrays (or np.memmap), got {type(a).__name__} for {name}: "
            "wrap it with np.asarray(...) first"
        )
    if a.dtype.hasobject:
        raise ValueError(f"{name} has dtype {a.dtype}, which holds Python objects: only fixed-size "
                         "dtypes can be gathered")
    if a.ndim < 1:
        raise ValueError(f"{name} is 0-dimensional: ArraySequence needs arrays of samples (first axis = samples)")
    expected = a.itemsize
    for d in range(a.ndim - 1, 0, -1):
        if a.shape[d] > 1 and a.strides[d] != expected:
            raise ValueError(
                f"{name} has rows that are not contiguous in memory (shape {a.shape}, strides {a.strides}): "
                "store it C-ordered, or pass np.ascontiguousarray(...) (which makes a copy)"
            )
        expected *= a.shape[d]
    return a


class ArraySequence(SampleBatches):
    """Batches of the rows of one or more equally long arrays.

    Args:
        *arrays: numpy arrays (or ``np.memmap``) whose first axis is the sample axis, or one dict
            of them. Batches are an array (one array given), a tuple (several), or a dict.
        batch_size: samples per batch.
        shuffle: shuffle samples every epoch, from ``(seed, epoch)``.
        seed: the seed of the shuffle; ``None`` draws one (see :attr:`seed`).
        drop_last: drop the last, partial batch.
        split_threads: threads that help gather a large batch (1 MiB or more) in a Prefetcher,
            besides the worker that loads it; default: the CPU count minus one. 0 never splits.

    Raises:
        ValueError: no arrays, arrays of different lengths, object dtypes, rows that are not
            contiguous, or a bad option (the message shows the value and how to fix it).
    """

    def __init__(
        self,
        *arrays: np.ndarray | Mapping[str, np.ndarray],
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        split_threads: int | None = None,
    ) -> None:
        if len(arrays) == 1 and isinstance(arrays[0], Mapping):
            mapping = dict(arrays[0])
            self._keys: tuple[Any, ...] | None = tuple(mapping)
            named: list[tuple[Any, Any]] = list(mapping.items())
        else:
            self._keys = None
            named = [(f"array {k}", a) for k, a in enumerate(arrays)]
        if not named:
            raise ValueError("ArraySequence needs at least one array")
        self._arrays = [_check_array(str(name), a) for name, a in named]
        lengths = {len(a) for a in self._arrays}
        if len(lengths) != 1:
            raise ValueError(
                "ArraySequence arrays must have equal first dimensions, got "
                + ", ".join(f"{name}: {len(a)}" for (name, _), a in zip(named, self._arrays))
            )
        super().__init__(batch_size, shuffle, seed, drop_last)
        given = _checks.whole_or_none("split_threads", split_threads, 0)
        self.split_threads = max(0, (os.cpu_count() or 1) - 1) if given is None else given
        self.samples = lengths.pop()

    @classmethod
    def from_npy(
        cls, *paths: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]], batch_size: int, **options: Any
    ) -> ArraySequence:
        """An ArraySequence over ``.npy`` files, memory-mapped read-only (nothing is read up front).

        Args:
            *paths: paths of ``.npy`` files, or one dict of them.
            batch_size: samples per batch.
            **options: ``shuffle``, ``seed``, ``drop_last``.
        """
        if len(paths) == 1 and isinstance(paths[0], Mapping):
            named = {k: np.load(p, mmap_mode="r") for k, p in paths[0].items()}
            return cls(named, batch_size=batch_size, **options)
        return cls(*[np.load(cast(PathLike, p), mmap_mode="r") for p in paths], batch_size=batch_size,
                   **options)

    def _batch_nbytes(self) -> int:
        """Buffer bytes a full batch takes: its columns one after the other, each at a 64-byte
        aligned offset (``csrc/core/gather.h``)."""
        total = 0
        for a in self._arrays:
            row = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
            total = -(-total // 64) * 64 + row * self.batch_size
        return total

    def batch_indices(self, index: int, epoch: int) -> slice | np.ndarray:
        """The samples of batch ``index`` in ``epoch``."""
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.samples)
        order = self.sample_order(epoch)
        return slice(start, stop) if order is None else order[start:stop]

    def __getitem__(self, index: int) -> Any:
        rows = self.batch_indices(self.batch_index(index), self.epoch)
        parts = [a[rows] for a in self._arrays]
        if self._keys is not None:
            return dict(zip(self._keys, parts))
        return parts[0] if len(parts) == 1 else tuple(parts)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that a plain loop's ``ds[i]`` shuffles for."""
        self.epoch = int(epoch)

    def on_epoch_end(self) -> None:
        """Advances the epoch (Keras calls this after every epoch)."""
        self.epoch += 1

    def native_source(self) -> _C.ArraySource:
        """A new core view of these arrays, for one Prefetcher (which keeps it for its lifetime).

        The arrays are shared, not copied. Each Prefetcher has its own because the source stores
        the sample orders of the epochs its owner plans, and drops those two epochs behind the
        latest one registered: see NOTE [ Gather prunes sample orders two epochs behind the plan ]
        in ``csrc/core/gather.h``. Two Prefetchers over one ArraySequence may be any number of
        epochs apart.
        """
        return _C.ArraySource(self._arrays, self._keys, self.batch_size, self.split_threads)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in self._arrays)
        return (
            f"ArraySequence({shapes}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last})"
        )
