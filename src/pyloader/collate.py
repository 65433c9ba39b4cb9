"""Collation of per-sample structures into batches, done by the workers.

A batch Sequence whose ``__getitem__`` gathers samples returns ``pyloader.stack(samples)``; the
worker then collates them straight into slot memory with the GIL released (one copy per sample
array, no intermediate batch array), like ``torch.utils.data.default_collate`` but in numpy:

- arrays of equal shape and dtype stack along a new first axis;
- Python ``bool``/``int``/``float`` become ``bool``/``int64``/``float64`` arrays, numpy scalars an
  array of their dtype;
- tuples, lists, namedtuples and dicts collate field by field (every sample must have the same
  structure and dict keys in the same order);
- anything else (strings, None, objects) becomes the list of the samples' values.

:func:`collate` does the same in plain numpy, for use outside a Prefetcher.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import _C, _tree

__all__ = ["collate", "stack"]


def stack(samples: Iterable[Any]) -> _C.Stack:
    """Marks a batch's samples for collation by the worker (see the module docstring).

    Args:
        samples: the per-sample structures of one batch.

    Returns:
        an object to return from ``__getitem__``; the Prefetcher delivers the collated batch.
    """
    return _C.Stack(samples)


def collate(samples: Sequence[Any]) -> Any:
    """Collates like :func:`stack` does in the workers, in plain numpy (a reference and fallback).

    Raises:
        ValueError: samples differ in structure, shape or dtype, or there are none.
    """
    if len(samples) == 0:
        raise ValueError("collate: no samples")
    first = samples[0]
    kind = _tree.kind(first)
    if kind is _tree.DICT:
        if any(type(s) is not dict or list(s) != list(first) for s in samples):
            raise ValueError("collate: samples have different dict keys")
        return {k: collate([s[k] for s in samples]) for k in first}
    if kind is not None:  # a tuple, list or namedtuple: field by field
        if any(type(s) is not type(first) or len(s) != len(first) for s in samples):
            raise ValueError("collate: samples have different structures")
        return _tree.rebuild(first, [collate([s[k] for s in samples]) for k in range(len(first))])
    if isinstance(first, np.ndarray) and first.dtype.kind != "O":
        if any(not isinstance(s, np.ndarray) or s.shape != first.shape or s.dtype != first.dtype for s in samples):
            raise ValueError("collate: arrays must have equal shapes and dtypes to stack")
        return np.stack(samples)
    for number, dtype in ((bool, np.bool_), (int, np.int64), (float, np.float64)):
        if all(type(s) is number for s in samples):
            return np.asarray(samples, dtype=dtype)
    if all(isinstance(s, np.generic) and s.dtype == first.dtype and s.dtype.kind != "O" for s in samples):
        return np.asarray(samples, dtype=first.dtype)
    return list(samples)
