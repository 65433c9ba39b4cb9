"""The plan: which Sequence index each position of an epoch loads.

A plan is a pure function of ``(seed, epoch, shard, len(sequence))``: any position of any epoch
can be recomputed by anyone at any time. That is what makes prefetching across epoch boundaries,
resuming from a ``state_dict`` and re-issuing lost work exact.

Sharding follows ``torch.utils.data.DistributedSampler``: the (shuffled) order is padded by
wrapping around until every rank has the same number of batches (or truncated, with
``drop_last=True``), and rank ``r`` takes every ``world_size``-th entry starting at ``r``.
"""

from __future__ import annotations

import math
import os
import reprlib
import sys
from dataclasses import dataclass

import numpy as np

from . import _checks


def fresh_seed() -> int:
    """A seed drawn from the OS's entropy, for ``seed=None`` (recorded in the state, so that a
    resumed run repeats the order)."""
    entropy = np.random.SeedSequence().entropy
    assert isinstance(entropy, int), "SeedSequence() draws an int when given no entropy"
    return entropy % (1 << 63)


@dataclass(frozen=True)
class Plan:
    """The order of one shard's batches, epoch by epoch.

    Attributes:
        length: ``len(sequence)``.
        shuffle: whether each epoch permutes the batch order.
        seed: the seed of every permutation (with the epoch).
        rank: this shard's rank.
        world_size: the number of shards.
        drop_last: drop the uneven tail instead of padding it.
    """

    length: int
    shuffle: bool
    seed: int
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False

    @property
    def epoch_length(self) -> int:
        """Number of batches this shard loads per epoch."""
        if self.world_size == 1:
            return self.length
        if self.drop_last:
            return self.length // self.world_size
        return math.ceil(self.length / self.world_size)

    def indices(self, epoch: int) -> np.ndarray:
        """The Sequence indices of ``epoch``, in order, as an int64 array."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.length).astype(np.int64, copy=False)
        else:
            order = np.arange(self.length, dtype=np.int64)
        if self.world_size == 1:
            return order
        total = self.epoch_length * self.world_size
        if total > len(order):  # pad by wrapping around, as often as needed
            reps = math.ceil(total / max(len(order), 1))
            order = np.tile(order, reps)[:total] if len(order) else order
        else:
            order = order[:total]
        return np.ascontiguousarray(order[self.rank : total : self.world_size])


def resolve_shard(shard: object) -> tuple[int, int]:
    """Turns the ``shard`` option into ``(rank, world_size)``.

    ``None`` is ``(0, 1)``. ``"auto"`` asks ``torch.distributed`` when torch is already imported
    and a process group is initialized, else reads the ``RANK`` and ``WORLD_SIZE`` environment
    variables, else ``(0, 1)``.

    Raises:
        ValueError: for anything else than None, "auto" or a valid ``(rank, world_size)``.
    """
    if shard is None:
        return 0, 1
    if shard == "auto":
        dist = getattr(sys.modules.get("torch"), "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return _check_shard((int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])))
        return 0, 1
    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        return _check_shard(tuple(shard))
    raise ValueError(
        f"shard must be None, 'auto' or (rank, world_size), got {shard!r}"
    )


def _check_shard(shard: tuple) -> tuple[int, int]:
    rank, world = shard
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard):
        raise ValueError(f"shard must hold two integers (rank, world_size), got {shard!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard=(rank, world_size) needs 0 <= rank < world_size, got {shard!r}")
    return int(rank), int(world)


def batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` over ``samples`` samples (the last one partial unless dropped)."""
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


def sample_permutation(seed: int, epoch: int, samples: int) -> np.ndarray:
    """The sample order of ``epoch`` for per-sample shuffling (``ArraySequence``, ``batches``):
    a permutation of ``range(samples)`` drawn from ``(seed, epoch)``, as int64."""
    return np.random.default_rng([seed, 1, epoch]).permutation(samples).astype(np.int64, copy=False)


class SampleBatches:
    """Batches of ``batch_size`` samples over ``samples`` samples, the samples permuted every
    epoch from ``(seed, epoch)`` when ``shuffle``: the batching ``ArraySequence`` and ``batches()``
    share, with their argument checks (made first, before the subclass reads its data, which then
    sets ``samples``).

    Attributes:
        samples, batch_size, shuffle, seed, drop_last: as given (``seed`` drawn when ``None``).
        seed_drawn: whether the seed was drawn (each process of a distributed run draws its own).
        epoch: the epoch ``self[i]`` follows in a plain loop; a Prefetcher passes its own.
    """

    samples: int  # set by the subclass, once it has checked its data

    def __init__(self, batch_size: int, shuffle: bool, seed: int | None, drop_last: bool) -> None:
        self.batch_size = _checks.whole("batch_size", batch_size, 1)
        self.shuffle = _checks.flag("shuffle", shuffle)
        self.drop_last = _checks.flag("drop_last", drop_last)
        self.seed_drawn = seed is None
        given = _checks.whole_or_none("seed", seed, 0)
        self.seed = fresh_seed() if given is None else given
        self.epoch = 0

    def __len__(self) -> int:
        return batch_count(self.samples, self.batch_size, self.drop_last)

    def batch_index(self, index: object) -> int:
        """``index`` checked and made non-negative (``-1`` is the last batch, as in a list)."""
        n = len(self)
        if not _checks.is_whole(index):
            raise TypeError(f"batch indices must be integers, got {type(index).__name__} ({reprlib.repr(index)})")
        assert isinstance(index, (int, np.integer)), "checked by is_whole"
        if not -n <= index < n:
            raise IndexError(f"batch index {index} is out of range for {n} batches")
        return int(index) % n

    def sample_order(self, epoch: int) -> np.ndarray | None:
        """The order of the samples in ``epoch`` (``None``: unshuffled, ``0, 1, 2, ...``)."""
        if not self.shuffle:
            return None
        return sample_permutation(self.seed, epoch, self.samples)
