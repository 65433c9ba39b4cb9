"""Streams: loading from iterables, in parallel, in a deterministic order, exactly once, resumable.

A :class:`Stream` loads data that has no index: a list of *shards* (files, ranges, generator
functions, re-iterable datasets), each read in whole by one worker. Its batches arrive round-robin
over the shards in their fixed order (shard 0's first batch, shard 1's first, ..., shard 0's
second, ...; a shard that ends drops out), so the order depends on the shards' contents only,
never on timing or on the number of workers. Each pass (``iter(stream)``) reads every shard once.

Example::

    def read(path):  # a shard: a function that returns an iterator
        ...

    with pyloader.Stream([functools.partial(read, p) for p in paths], batch_size=32,
                         shuffle_buffer=1000, seed=0, workers=4) as stream:
        for epoch in range(epochs):
            for batch in stream:
                ...

How it works (see :mod:`pyloader._stream`): a Prefetcher loads the stream's *slots*, one batch of
one shard each, with the shards laid out over its workers so that each shard stays on one worker,
which keeps the shard's iterator. Everything a Prefetcher does applies: loading ahead, leased
buffers, native collation (items collate into the batch's buffer like :func:`pyloader.stack`),
``stats()``, pinning, ``mode="process"`` and its replacement of dead workers.

Exactly once: a worker asked for a shard's batch ``r`` while its iterator is elsewhere (a resumed
:meth:`Stream.load_state_dict`, a replacement for a worker process that died, a new pass) reopens
the shard and reads and drops the items before it (a shard with ``iter_from(n)`` skips them at
once). A shard that yields the same items in the same order each time it is opened is therefore
delivered exactly once, crashes and resumes included. A shard that does not (a live feed, a
random generator without a seed) gets, after a reopen, whatever it yields then: its items are
still counted, so none is delivered twice *by position*, but the items themselves may differ.

A single iterator (a generator object) is a stream of one shard that can be read once: it is
loaded by one worker thread, ahead of the loop, and refuses what would need it read again (a second
pass, a resume, process mode). Loading it with several workers needs shards: a generator function
per part of the data.

Errors: an exception raised by a shard reaches the loop as a :class:`~pyloader.BatchError` whose
``__cause__`` is the shard's exception, naming the shard and the item; that shard ends there for
this pass (a generator that raised cannot go on) and the loop can go on with the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import _checks, _stream
from ._closing import Closing
from ._errors import BatchError
from ._plan import fresh_seed, resolve_shard
from ._stream import Marker, StreamSource
from .prefetcher import Prefetcher

__all__ = ["Stream"]

_STATE_VERSION = 1
_QUIESCE_S = 2.0  # at most this long for the workers to finish the slots past a pass's end


class Stream(Closing):
    """Loads a list of shards ahead of the loop, round-robin over the shards (module docstring).

    Args:
        shards: the stream's shards, in order: each a function returning an iterator (e.g. a
            generator function or a ``functools.partial`` of one), a re-iterable object (a list, an
            ``IterableDataset``; ``iter(shard)`` is called per pass), or one iterator (alone: see
            the module docstring). A shard may offer ``iter_from(n)``, an iterator that starts at
            its item ``n``, which resumes skip with instead of reading.
        batch_size: items per batch, collated in the worker; None (the default): each item is a
            batch as it is.
        drop_last: drop each shard's last batch if it has fewer than ``batch_size`` items
            (batches are per shard, as torch's workers batch their own items).
        collate: a function from a list of items to a batch, run in the worker; None: collated
            natively into the batch's buffer, as :func:`pyloader.stack` does.
        shuffle_buffer: each shard's items pass through a shuffle buffer of this many items (as
            tf.data's ``shuffle``), seeded from ``(seed, pass, shard)``; 0 (the default): none.
        seed: the seed of the shuffle buffers; None draws a fresh one (kept in ``state_dict()``).
        shard: ``(rank, world_size)`` or ``"auto"`` (see :class:`~pyloader.Prefetcher`): this rank
            takes shards ``rank, rank + world_size, ...``. When the shard count is not a multiple
            of ``world_size``, the first ``count % world_size`` ranks have one shard more, so ranks
            may see different numbers of batches: give a multiple of ``world_size`` shards to keep
            ranks in step. Every rank needs at least one shard.
        workers: worker threads (or processes); None (the default): 4. More than this rank's shard
            count would idle, and are not started.
        **options: the other options of :class:`~pyloader.Prefetcher` (``depth``, default
            ``2 * workers``; ``mode``, default ``"thread"``; ``timeout``, ``pin``...; not tuned
            while loading).

    Raises:
        TypeError: a shard is none of the above, or a single iterator is given with other shards,
            several workers or ``mode="process"``.
        ValueError: an option has a bad value, or this rank has no shard.
    """

    def __init__(
        self,
        shards: Iterable[Any],
        *,
        batch_size: int | None = None,
        drop_last: bool = False,
        collate: Callable[[list[Any]], Any] | None = None,
        shuffle_buffer: int = 0,
        seed: int | None = None,
        shard: object = None,
        workers: int | None = None,
        **options: Any,
    ) -> None:
        self._loader: Prefetcher | None = None
        if isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable) or _stream.is_one_shot(shards):
            raise TypeError(
                f"shards must be a list of shards, got {type(shards).__name__} (for one iterator, "
                f"give [iterator] or use pyloader.prefetch(iterator))"
            )
        shards = list(shards)
        for k, s in enumerate(shards):
            _stream.check_shard(s, k)
        if not shards:
            raise ValueError("a Stream needs at least one shard")
        batch_size = _checks.whole_or_none("batch_size", batch_size, 1)
        shuffle_buffer = _checks.whole("shuffle_buffer", shuffle_buffer, 0)
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be callable, got {type(collate).__name__}")
        if collate is not None and batch_size is None:
            raise ValueError("collate needs batch_size: without it every item is a batch as it is")
        rank, world = resolve_shard(shard)
        names = list(range(len(shards)))[rank::world]
        if not names:
            raise ValueError(
                f"rank {rank} of {world} has no shard: the stream has {len(shards)} shards; give at "
                f"least as many shards as ranks"
            )
        mine = [shards[k] for k in names]
        self.one_shot = any(_stream.is_one_shot(s) for s in shards)
        if self.one_shot:
            what = None
            if len(shards) > 1:
                what = f"it is one of {len(shards)} shards"
            elif workers is not None and workers != 1:
                what = f"workers={workers} were asked for"
            elif options.get("mode", "thread") != "thread":
                what = f"mode={options['mode']!r} copies the stream into worker processes"
            if what is not None:
                raise TypeError(
                    f"a single iterator (a generator) can be read by one worker thread only, but "
                    f"{what}: to load in parallel, split the data into shards (e.g. a generator "
                    f"function per file or range) and give their list"
                )
        self.batch_size = batch_size
        self.seed = fresh_seed() if seed is None else seed
        self.rank, self.world_size = rank, world
        self.shards_total = len(shards)
        workers = _checks.whole_or_none("workers", workers, 1)
        workers = min(4 if workers is None else workers, len(mine))
        self._source = StreamSource(
            mine, names, workers, batch_size, bool(drop_last), collate, shuffle_buffer, self.seed
        )
        # Fixed settings: the autotuner restarts engines between epochs, which for a stream means
        # replaying shards (and a single iterator cannot be replayed).
        options.setdefault("mode", "thread")
        options.setdefault("depth", None)  # 2 * workers
        self._options = dict(options, workers=workers, shuffle=False)
        self._loader = Prefetcher(self._source, **self._options)
        self._pass = 0
        self._next_pass_started = False
        self._iterator: _StreamIterator | None = None

    @property
    def loader(self) -> Prefetcher:
        """The :class:`~pyloader.Prefetcher` that loads the stream's slots."""
        if self._loader is None:
            raise RuntimeError("this Stream is closed")
        return self._loader

    @property
    def workers(self) -> int:
        """Workers loading the stream (at most one per shard of this rank)."""
        return self.loader.workers

    @property
    def mode(self) -> str:
        """``"thread"`` or ``"process"``."""
        return self.loader.mode

    @property
    def shards(self) -> int:
        """This rank's shards."""
        return len(self._source.shards)

    @property
    def pass_number(self) -> int:
        """The pass the next ``iter()`` starts, or the current one."""
        return self._pass

    def __iter__(self) -> Iterator[Any]:
        """One pass over every shard of this rank: the batches round-robin over the shards.

        A pass left before its end (a ``break``) is over: the next ``iter()`` starts the next pass.
        """
        loader = self.loader
        if self._iterator is not None and not self._iterator.done:
            self._end_pass(self._iterator)  # the previous pass was left unfinished
        if self.one_shot and self._pass > 0:
            raise TypeError(
                "a single iterator (a generator) is read once: this Stream's one pass is over; give "
                "a generator function (a shard that reopens) to read the data again"
            )
        epoch = loader._resume[0] if loader._engine is None else loader._position()[0]
        if epoch >> _stream._PASS_SHIFT != self._pass:
            loader.set_epoch(self._pass << _stream._PASS_SHIFT)
        self._iterator = _StreamIterator(self, self._pass)
        return self._iterator

    def _end_pass(self, iterator: _StreamIterator) -> None:
        iterator.done = True
        self._pass = iterator.pass_ + 1
        loader = self.loader
        # The engine loads on past the end (slots of ended shards): let the workers finish those
        # first, so that the stop replaces no worker process (whose state a persistent torch worker
        # keeps from pass to pass).
        loader._quiesce(_QUIESCE_S)
        loader.set_epoch(self._pass << _stream._PASS_SHIFT)  # stops the engine; the next iter() starts it

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: its pass, and the next slot of the pass, as ``(round, shard)``
        (independent of the number of workers), with the seed and what the batches are made of.

        Loaded into a new Stream over the same shards (:meth:`load_state_dict`), the next ``iter()``
        yields exactly the batches an uninterrupted run would have yielded next."""
        loader = self.loader
        state = loader.state_dict()
        epoch, consumed = state["epoch"], state["batches_consumed"]
        pass_, r, i = self._source.slot(epoch, consumed)
        if self._iterator is not None and self._iterator.done or pass_ < self._pass:
            pass_, r, i = self._pass, 0, 0
        elif i >= len(self._source.shards):  # a padding slot: the next round's first
            r, i = r + 1, 0
        return {
            "version": _STATE_VERSION,
            "pass": pass_,
            "round": r,
            "slot": i,
            "seed": self.seed,
            "shards": self.shards_total,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle_buffer": self._source.shuffle_buffer,
            "drop_last": self._source.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state_dict` taken over the same shards and options.

        Raises:
            ValueError: the state is malformed or was taken with other shards or options.
            TypeError: this Stream reads a single iterator, which cannot be read again.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a pyloader Stream state_dict (version {_STATE_VERSION}): {state!r}")
        source = self._source
        for key, mine in (("shards", self.shards_total), ("rank", self.rank), ("world_size", self.world_size),
                          ("batch_size", self.batch_size), ("shuffle_buffer", source.shuffle_buffer),
                          ("drop_last", source.drop_last)):
            if state.get(key) != mine:
                raise ValueError(
                    f"state_dict was taken with {key}={state.get(key)!r} but this Stream has {key}={mine!r}"
                )
        where: list[Any] = [state.get(k) for k in ("pass", "round", "slot")]
        if not all(isinstance(v, int) and v >= 0 for v in where) or where[2] >= len(source.shards):
            raise ValueError(f"state_dict has a bad position: pass, round, slot = {where}")
        pass_, r, i = (int(v) for v in where)
        if self.one_shot and (pass_, r, i) != (0, 0, 0):
            raise TypeError("a single iterator (a generator) cannot be resumed: it cannot be read again")
        if source.seed != state["seed"]:
            source.seed = self.seed = state["seed"]
            self.loader.close()  # its workers (processes) hold the old seed: start new ones
            self._loader = Prefetcher(source, **self._options)
        j = r * source.round + i
        loader_state = self.loader.state_dict()
        loader_state.update(epoch=pass_ << _stream._PASS_SHIFT | j // source.chunk, batches_consumed=j % source.chunk)
        self.loader.load_state_dict(loader_state)
        self._pass = pass_
        self._iterator = None

    def stats(self) -> dict[str, Any]:
        """The Prefetcher's figures (:meth:`pyloader.Prefetcher.stats`); its epochs are the
        stream's chunks of slots (``pass << 32 | chunk``)."""
        return self.loader.stats()

    def close(self) -> None:
        """Stops and joins the workers. Idempotent."""
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.close()

    def __repr__(self) -> str:
        state = "closed" if self._loader is None else f"pass {self._pass}, {self._loader.workers} workers"
        return f"Stream({len(self._source.shards)} shards, batch_size={self.batch_size}, {state})"


class _StreamIterator:
    """One pass of a :class:`Stream`. After an error the iterator stays usable: ``next()`` goes on
    with the next batch (of the other shards: the one that raised has ended)."""

    def __init__(self, stream: Stream, pass_: int) -> None:
        self.stream = stream
        self.pass_ = pass_
        self.done = False
        self._chunk: Iterator[Any] | None = None
        self._ended: set[int] = set()

    def __iter__(self) -> _StreamIterator:
        return self

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        stream = self.stream
        shards = len(stream._source.shards)
        while True:
            if self._chunk is None:
                self._chunk = iter(stream.loader)
            try:
                batch = next(self._chunk)
            except StopIteration:
                self._chunk = None
                continue
            except BatchError as error:
                raise _stream_error(error) from error.__cause__
            if type(batch) is Marker:
                if batch.kind == "end":
                    self._ended.add(batch.shard)
                    if len(self._ended) == shards:
                        stream._end_pass(self)
                        raise StopIteration
                continue
            return batch


def _stream_error(error: BatchError) -> BatchError:
    """The consumer's error for a shard that raised: names the shard and the item."""
    cause = error.__cause__
    where = getattr(cause, "_pyloader_shard", None)
    if where is None:
        return error
    shard, item, batch = where
    out = BatchError(
        f"shard {shard} raised {type(cause).__name__}: {cause} at its item {item} (its batch "
        f"{batch}); the shard ends there this pass, the other shards go on",
        index=batch,
        epoch=error.epoch,
        position=error.position,
        worker=error.worker,
    )
    out.shard = shard  # type: ignore[attr-defined]
    out.item = item  # type: ignore[attr-defined]
    return out


def is_stream_like(obj: object) -> bool:
    """True for what :func:`pyloader.prefetch` loads as a stream: an iterator (a generator)."""
    return inspect.isgenerator(obj) or (isinstance(obj, Iterator) and not hasattr(obj, "__getitem__"))
