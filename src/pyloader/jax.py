"""JAX adapter: batches as ``jax.Array``, placed on a sharding ahead of the training step.

:func:`prefetch` puts a :class:`~pyloader.Prefetcher` in front of the devices: each delivered
batch's arrays are put on a ``jax.sharding.Sharding`` (default: the first local device) ``ahead``
batches before the consumer takes them, so that loading (the Prefetcher's workers), the
host-to-device copy (jax's asynchronous dispatch) and the step overlap.

Copies. ``jax.device_put`` of a numpy array onto a CPU device does not copy when jax can alias
the buffer (jax 0.10: a C-contiguous array of a dtype jax holds, whose data is suitably aligned;
pyloader's slot arrays are 64-byte aligned): the ``jax.Array`` is then a view of the slot and
keeps the numpy array, and so the slot's lease, alive as long as it lives (checked by
``tests/test_jax.py``). A dtype jax does not hold (``int64``/``float64`` without
``jax_enable_x64``) is converted by jax, which copies; so does every accelerator transfer (the
slot is released once the array no longer needs it).

Several processes (``jax.process_count() > 1``, after ``jax.distributed.initialize``): the
default ``shard="auto"`` gives each process its share of the batches (``jax.process_index()`` of
``jax.process_count()``, ``DistributedSampler`` semantics) and every leaf becomes one global array
assembled with ``jax.make_array_from_process_local_data`` (the process-local batches concatenated
along the first axis, in process order, for a sharding over every process's devices).

Resumption: :meth:`JaxPrefetcher.state_dict` counts the batches the consumer has taken, not the
ones put on the devices ahead of it; :meth:`JaxPrefetcher.load_state_dict` also sets the epoch of
a :func:`pyloader.batches` Sequence (in its worker processes too), whose sample order depends on it.

Leaves that are not numpy arrays pass through unchanged; ``jax.Array`` leaves that a Sequence's
``__getitem__`` returns become numpy arrays on the worker (so they travel through slot memory),
then arrays on the sharding like the rest.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from . import _checks, _tree
from ._batches import Batches, jax_to_numpy
from ._closing import Closing
from .arrays import ArraySequence
from .prefetcher import Prefetcher

__all__ = ["JaxPrefetcher", "prefetch"]


class _NumpyLeaves:
    """A Sequence whose batches have their ``jax.Array`` leaves turned into numpy arrays (on the
    worker that loads them). Every other attribute (``on_epoch_end`` above all) is the wrapped
    Sequence's."""

    def __init__(self, sequence: Any) -> None:
        self.sequence = sequence

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, index: int) -> Any:
        return jax_to_numpy(self.sequence[index])

    def __getattr__(self, name: str) -> Any:
        if name == "sequence":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sequence, name)


def _resolve_shard(shard: Any) -> Any:
    """``"auto"`` is JAX's processes: ``(jax.process_index(), jax.process_count())``."""
    if isinstance(shard, str) and shard == "auto":
        count = jax.process_count()
        return None if count == 1 else (jax.process_index(), count)
    return shard


class JaxPrefetcher(Closing):
    """Batches of a Sequence as ``jax.Array``, put on a sharding ahead of the consumer.

    Args:
        source: a batch Sequence (``__len__``, ``__getitem__``): a :func:`pyloader.batches`, an
            :class:`~pyloader.ArraySequence`, a class of your own.
        sharding: where every array leaf goes: a ``jax.sharding.Sharding`` (a ``NamedSharding``
            over a mesh, a ``SingleDeviceSharding``), or a ``jax.Device``; default: the first local
            device.
        ahead: batches put on the devices ahead of the one the consumer holds (from the second
            batch of a pass on: the first is handed out as soon as it is placed).
        shard: ``"auto"`` (JAX's process index and count; no sharding in one process),
            ``(rank, world_size)``, or ``None``.
        **options: :class:`~pyloader.Prefetcher` options (``workers``, ``depth``, ``mode``...).
            With ``mode="process"``, ``start_method`` defaults to ``"forkserver"``: the worker
            processes start from a fresh interpreter that receives the Sequence pickled, for a
            fork of a process running JAX could deadlock.

    Raises:
        ValueError: a bad option; a shuffled :func:`pyloader.batches` without a seed in several
            processes (they must agree on the sample order).
    """

    def __init__(self, source: Any, *, sharding: Any = None, ahead: int = 2, shard: Any = "auto",
                 **options: Any) -> None:
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        elif isinstance(sharding, jax.Device):
            sharding = jax.sharding.SingleDeviceSharding(sharding)
        elif not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(
                f"sharding must be a jax.sharding.Sharding, a jax.Device or None, got {sharding!r}"
            )
        self.ahead = _checks.whole("ahead", ahead, 1)
        self.sharding = sharding
        self.processes = jax.process_count()
        shard = _resolve_shard(shard)
        if isinstance(source, Batches) and source.shuffle and source.seed_drawn and self.processes > 1:
            raise ValueError(
                f"pyloader.batches(..., shuffle=True) was given no seed, but {self.processes} JAX "
                "processes must agree on the sample order: pass seed=<the same integer everywhere>"
            )
        if options.get("mode") == "process":
            # JAX's runtime is multithreaded: a fork of this process could deadlock in it (jax warns
            # at every os.fork()). The worker processes start from a fresh interpreter instead.
            options.setdefault("start_method", "forkserver")
        self.source = source
        sequence = source if isinstance(source, (ArraySequence, Batches)) else _NumpyLeaves(source)
        self.prefetcher = Prefetcher(sequence, shard=shard, **options)
        # The live pass: its start state, batches taken from the Prefetcher and handed out.
        self._pass: list[Any] = [None, 0, 0]  # [start state, taken, yielded]

    def __len__(self) -> int:
        return len(self.prefetcher)

    @property
    def epoch(self) -> int:
        """The epoch the consumer is in (or about to start)."""
        return self.prefetcher.epoch

    def _put(self, batch: Any) -> Any:
        """The batch with its numpy leaves on the sharding (one ``device_put`` for all of them:
        jax's per-call overhead is paid once per batch)."""
        arrays = [leaf for leaf in _tree.leaves(batch) if isinstance(leaf, np.ndarray)]
        if not arrays:
            return batch
        if self.processes > 1:
            placed = iter([jax.make_array_from_process_local_data(self.sharding, a) for a in arrays])
        else:
            placed = iter(jax.device_put(arrays, self.sharding))
        return _tree.map_structure(lambda x: next(placed) if isinstance(x, np.ndarray) else x, batch)

    def __iter__(self) -> Iterator[Any]:
        """One epoch of batches (see :class:`~pyloader.Prefetcher` for epochs and resumption)."""
        host = iter(self.prefetcher)
        self._pass = [self.prefetcher.state_dict(), 0, 0]
        return self._ahead(host, self._pass)

    def _ahead(self, host: Iterator[Any], live: list[Any]) -> Iterator[Any]:
        # The first batch goes out as soon as it is placed (no wait for the ones behind it); from
        # the second on, ``ahead`` batches are placed behind the one handed out.
        queue: collections.deque[Any] = collections.deque()
        more = True
        while True:
            while more and len(queue) < (1 if live[2] == 0 else self.ahead + 1):
                try:
                    batch = next(host)
                except StopIteration:
                    more = False
                    break
                queue.append(self._put(batch))
                live[1] += 1
            if not queue:
                return
            batch = queue.popleft()
            live[2] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is (the batches it took; not those put on the devices ahead of it):
        loading it into a new JaxPrefetcher over the same source yields exactly the batches this
        one would have yielded next. See :meth:`pyloader.Prefetcher.state_dict`."""
        start, taken, yielded = self._pass
        if start is None or taken == yielded:
            return self.prefetcher.state_dict()
        return dict(start, batches_consumed=start["batches_consumed"] + yielded)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state_dict`: the next pass resumes that epoch where it stopped
        (a :func:`pyloader.batches` source is set to that epoch, in its worker processes too).

        Raises:
            ValueError: see :meth:`pyloader.Prefetcher.load_state_dict`.
        """
        self.prefetcher.load_state_dict(state)  # checks it first: a bad state changes nothing
        if isinstance(self.source, Batches):
            self.prefetcher._renew("set_epoch", state["epoch"])  # (moves the resume point: again)
            self.prefetcher.load_state_dict(state)
        self._pass = [None, 0, 0]

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass be epoch ``epoch`` from its start."""
        if isinstance(self.source, Batches):
            self.prefetcher._renew("set_epoch", epoch)
        self.prefetcher.set_epoch(epoch)
        self._pass = [None, 0, 0]

    def stats(self) -> dict[str, Any]:
        """The Prefetcher's :meth:`~pyloader.Prefetcher.stats`."""
        return self.prefetcher.stats()

    def close(self) -> None:
        """Stops the Prefetcher's workers."""
        self.prefetcher.close()

    def __repr__(self) -> str:
        return f"JaxPrefetcher({self.prefetcher!r}, sharding={self.sharding}, ahead={self.ahead})"


def prefetch(source: Any, *, sharding: Any = None, ahead: int = 2, **options: Any) -> JaxPrefetcher:
    """A Sequence of batches to an iterable of ``jax.Array`` batches, loaded and placed ahead.

    Example::

        import jax
        import numpy as np
        import pyloader
        import pyloader.jax

        x = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
        seq = pyloader.batches(x, 100, shuffle=True, seed=0)
        with pyloader.jax.prefetch(seq, workers=2) as loader:
            for epoch in range(2):
                for batch in loader:
                    assert isinstance(batch, jax.Array) and batch.shape == (100, 8)

    Args:
        source: the batch Sequence.
        sharding: a ``jax.sharding.Sharding`` (or a ``jax.Device``); default: the first local
            device.
        ahead: batches put on the devices ahead of the consumer.
        **options: ``shard`` (default ``"auto"``: JAX's processes) and the
            :class:`~pyloader.Prefetcher` options.

    Returns:
        a :class:`JaxPrefetcher`; each ``iter()`` is one epoch.
    """
    return JaxPrefetcher(source, sharding=sharding, ahead=ahead, **options)
