"""pyloader: a C++-accelerated batch prefetcher for Python training loops.

Wrap a Sequence (``__len__`` = number of batches, ``__getitem__(i)`` = batch ``i``) in a
:class:`Prefetcher`; iterate it once per epoch. Batches load ahead on native threads into reusable
buffers and arrive in a deterministic order, each exactly once. ``mode="process"`` loads them in
worker processes that write into shared memory, for a ``__getitem__`` that holds the GIL.
:func:`batches` makes a per-sample dataset such a Sequence (samples collated natively by the
workers). Adapters: :mod:`pyloader.torch`, :mod:`pyloader.keras`, :mod:`pyloader.jax`.
"""

from __future__ import annotations

from ._batches import Batches, batches
from ._errors import (
    BatchError,
    EpochEndError,
    PoolExhaustedError,
    PoolExhaustedWarning,
    StallWarning,
    WorkerDiedError,
)
from .arrays import ArraySequence
from .collate import collate, stack
from .prefetcher import Prefetcher, prefetch
from .streams import Stream

__version__ = "0.1.0"

__all__ = [
    "ArraySequence",
    "BatchError",
    "Batches",
    "EpochEndError",
    "PoolExhaustedError",
    "PoolExhaustedWarning",
    "Prefetcher",
    "StallWarning",
    "Stream",
    "WorkerDiedError",
    "__version__",
    "batches",
    "collate",
    "prefetch",
    "stack",
]
