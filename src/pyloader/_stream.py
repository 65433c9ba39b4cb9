"""The worker's side of a stream: shards read in whole by one worker each, batched, on demand.

A stream (see :mod:`pyloader.streams`) is loaded by an ordinary Prefetcher over a
:class:`StreamSource`, an object the engine treats like a Sequence with two differences, both
announced by its ``_pyloader_stream_source`` attribute: the engine calls it as
``source[(epoch, index)]``, and it hands positions to its workers round-robin (worker ``w`` loads
positions ``w, w + workers, ...``: ``Loader::round_robin``), so that a shard always goes to the same
worker, which keeps the shard's iterator between batches.

The layout of one pass over ``S`` shards and ``W`` workers: a *round* is ``R = ceil(S / W) * W``
slots, slot ``i`` of a round is shard ``i`` (slots ``S..R-1`` are padding, "pad" markers), and
round ``r`` asks each shard for its batch ``r``. Slot ``i`` is loaded by worker ``i % W``, since
``R`` is a multiple of ``W``. A shard that has no batch ``r`` answers an "end" marker. So the batches
arrive round-robin over the shards in their fixed order, shards that ended dropping out, whatever the
number of workers: the order is a function of the shards' contents only. The consumer drops the
markers and ends the pass once every shard has answered "end".

Positions are planned as Prefetcher epochs of ``C`` slots (a multiple of ``R``: *chunks*), and the
epoch number carries the pass: epoch ``pass << _PASS_SHIFT | chunk``. Slot ``j`` of a pass is
position ``j % C`` of chunk ``j // C``.

A worker keeps, per shard, a cursor (the iterator, the batches and items it has produced). Asked for
batch ``r``, it reads on from the cursor when the cursor is at ``r``; otherwise (a resumed pass, a
replacement for a worker process that died, a new pass) it reopens the shard and reads and drops
the batches before ``r`` (``iter_from(n)`` on the shard skips ``n`` items at once, when the shard has
it and no shuffle buffer is used). A shard that re-reads the same items in the same order therefore
gives every batch exactly once however often it is reopened. The seeded shuffle buffer is part of
the replay: its contents and random state at batch ``r`` are what reading the shard from its start
makes them, so a resumed pass continues with exactly the buffer an uninterrupted one had.
"""

from __future__ import annotations

import inspect
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np

from ._errors import add_note
from .collate import stack

_PASS_SHIFT = 32  # epoch = pass << _PASS_SHIFT | chunk
_CHUNK_SLOTS = 1024  # slots per chunk epoch, rounded up to whole rounds


class Marker:
    """What a slot that carries no batch delivers: ``kind`` "end" (shard ``shard`` has no more
    batches this pass) or "pad" (a padding slot of the round)."""

    __slots__ = ("kind", "shard")

    def __init__(self, kind: str, shard: int) -> None:
        self.kind = kind
        self.shard = shard

    def __reduce__(self) -> tuple[Any, ...]:
        return (Marker, (self.kind, self.shard))

    def __repr__(self) -> str:
        return f"Marker({self.kind!r}, {self.shard})"


def is_one_shot(shard: object) -> bool:
    """True for an iterator (a generator): it can be read once, never reopened."""
    return isinstance(shard, Iterator) or inspect.isgenerator(shard)


def check_shard(shard: object, k: int) -> None:
    """Refuses what cannot be a shard, naming it (``k``: its number)."""
    if is_one_shot(shard) or callable(shard) or isinstance(shard, Iterable):
        return
    raise TypeError(
        f"shard {k} is a {type(shard).__name__}: a shard is an iterable (a list, a re-iterable "
        f"object, an IterableDataset), a function returning an iterator (a generator function), "
        f"or a single iterator"
    )


def _open(shard: Any, skip: int, buffered: bool, first: bool) -> tuple[Iterator[Any], int]:
    """A fresh iterator over ``shard`` and how many items it has already skipped (0 or ``skip``);
    ``first``: the shard was never opened (a single iterator can be used then, from its start)."""
    if is_one_shot(shard):
        if first and skip == 0:
            return shard, 0
        raise RuntimeError(
            "a plain iterator (a generator) can be read once: this pass needs it read again (a new "
            "pass, a resumed state_dict or a worker replaced after it died); give a shard that "
            "reopens instead, e.g. the generator function rather than the generator"
        )
    if skip and not buffered and hasattr(shard, "iter_from"):
        return iter(shard.iter_from(skip)), skip
    if callable(shard) and not isinstance(shard, Iterable):
        return iter(shard()), 0
    return iter(shard), 0


class _ShuffleBuffer:
    """tf.data's ``shuffle(buffer_size)`` over one shard's items: the first ``size`` items fill it,
    then each item taken is a uniformly drawn one, replaced by the next item read; when the shard
    ends the rest leave in random order. The draws come from ``random.Random(seed)``."""

    __slots__ = ("_items", "_rng", "_size")

    def __init__(self, size: int, seed: int) -> None:
        self._items: list[Any] = []
        self._rng = random.Random(seed)
        self._size = size

    def take(self, read: Callable[[], tuple[bool, Any]]) -> tuple[bool, Any]:
        """The next item out: ``(True, item)``, or ``(False, None)`` when it and the shard are empty."""
        items = self._items
        while len(items) < self._size:
            ok, item = read()
            if not ok:
                break
            items.append(item)
        if not items:
            return False, None
        j = self._rng.randrange(len(items))
        out = items[j]
        ok, item = read() if len(items) == self._size else (False, None)
        if ok:
            items[j] = item
        else:
            items[j] = items[-1]
            items.pop()
        return True, out


class _Cursor:
    """Where one worker is in one shard: the next batch it makes, the items it has read."""

    __slots__ = ("pass_", "iterator", "buffer", "batch", "items", "ended")

    def __init__(self, pass_: int) -> None:
        self.pass_ = pass_
        self.iterator: Iterator[Any] | None = None
        self.buffer: _ShuffleBuffer | None = None
        self.batch = 0  # the next batch this cursor makes
        self.items = 0  # items read from the shard (skipped ones included)
        self.ended = False


class StreamSource:
    """The engine's view of a stream (see the module docstring): ``source[(epoch, index)]``.

    Args:
        shards: this rank's shards, in their fixed order.
        names: each shard's number in the stream (before ranks took theirs), for messages.
        workers: the Prefetcher's workers (the round is laid out over them).
        batch_size: items per batch, or None: every item is a batch as it is.
        drop_last: drop a shard's last batch when it has fewer than ``batch_size`` items.
        collate: turns a list of items into a batch in the worker; None: collated natively into
            the batch's buffer (:func:`pyloader.stack`).
        shuffle_buffer: items of each shard's seeded shuffle buffer (0: none).
        seed: the stream's seed (shuffle buffers draw from ``(seed, pass, shard)``).
    """

    _pyloader_stream_source = True

    def __init__(
        self,
        shards: list[Any],
        names: list[int],
        workers: int,
        batch_size: int | None,
        drop_last: bool,
        collate: Callable[[list[Any]], Any] | None,
        shuffle_buffer: int,
        seed: int,
    ) -> None:
        self.shards = shards
        self.names = names
        self.round = -(-len(shards) // workers) * workers
        self.chunk = self.round * max(1, -(-_CHUNK_SLOTS // self.round))
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.collate = collate
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self._cursors: dict[int, _Cursor] = {}
        self._opened: set[int] = set()  # shards opened by this copy of the source
        self._locks = [threading.Lock() for _ in shards]

    def __getstate__(self) -> dict[str, Any]:  # to a worker process: no cursors, no locks
        state = self.__dict__.copy()
        state["_cursors"] = {}
        state["_opened"] = set()
        del state["_locks"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._locks = [threading.Lock() for _ in self.shards]

    def __len__(self) -> int:
        return self.chunk

    def slot(self, epoch: int, index: int) -> tuple[int, int, int]:
        """``(pass, round, slot in the round)`` of position ``index`` of chunk epoch ``epoch``."""
        pass_, chunk = epoch >> _PASS_SHIFT, epoch & ((1 << _PASS_SHIFT) - 1)
        r, i = divmod(chunk * self.chunk + index, self.round)
        return pass_, r, i

    def __getitem__(self, key: tuple[int, int]) -> Any:
        pass_, r, i = self.slot(*key)
        if i >= len(self.shards):
            return Marker("pad", i)
        with self._locks[i]:  # one worker per shard; an abandoned thread may still be inside
            return self._batch(i, pass_, r)

    def _batch(self, i: int, pass_: int, r: int) -> Any:
        cursor = self._cursors.get(i)
        if cursor is None or cursor.pass_ != pass_ or cursor.batch > r or cursor.iterator is None:
            if cursor is not None and cursor.ended and cursor.pass_ == pass_ and cursor.batch <= r:
                return Marker("end", i)
            cursor = self._reopen(i, pass_, r)
        while cursor.batch < r and not cursor.ended:  # replay: read and drop the batches before r
            try:
                self._read_batch(i, cursor)
            except Exception:
                cursor.ended = True  # its error was delivered with that earlier batch
        if cursor.ended:
            return Marker("end", i)
        items = self._read_batch(i, cursor)
        if items is None:
            return Marker("end", i)
        if self.batch_size is None:
            return items[0]
        if self.collate is not None:
            return self.collate(items)
        return stack(items)

    def _reopen(self, i: int, pass_: int, r: int) -> _Cursor:
        cursor = self._cursors[i] = _Cursor(pass_)
        per_batch = 1 if self.batch_size is None else self.batch_size
        buffered = self.shuffle_buffer > 0
        try:
            first = i not in self._opened
            self._opened.add(i)
            cursor.iterator, cursor.items = _open(self.shards[i], r * per_batch, buffered, first)
        except Exception as exc:
            cursor.ended = True
            add_note(exc, f"pyloader: raised opening shard {self.names[i]} (pass {pass_})")
            raise
        cursor.batch = cursor.items // per_batch
        if buffered:
            seq = np.random.SeedSequence([self.seed, pass_, self.names[i]])
            cursor.buffer = _ShuffleBuffer(self.shuffle_buffer, int(seq.generate_state(1)[0]))
        return cursor

    def _read_batch(self, i: int, cursor: _Cursor) -> list[Any] | None:
        """The cursor's next batch of items (None: the shard has no more), or raises what the
        shard raised, with a note naming the shard and the item."""
        want = 1 if self.batch_size is None else self.batch_size
        iterator = cursor.iterator
        assert iterator is not None

        def read() -> tuple[bool, Any]:
            try:
                item = next(iterator)
            except StopIteration:
                return False, None
            cursor.items += 1
            return True, item

        items: list[Any] = []
        try:
            if cursor.buffer is None:
                # list.extend keeps the items it appended when the iterator raises: the count
                # still names the failing item. (islice: no Python call per item.)
                try:
                    items.extend(islice(iterator, want))
                finally:
                    cursor.items += len(items)
            else:
                while len(items) < want:
                    ok, item = cursor.buffer.take(read)
                    if not ok:
                        break
                    items.append(item)
        except Exception as exc:
            cursor.ended = True
            add_note(
                exc,
                f"pyloader: raised by shard {self.names[i]} reading its item {cursor.items} "
                f"(batch {cursor.batch} of the shard, pass {cursor.pass_})",
            )
            exc._pyloader_shard = (self.names[i], cursor.items, cursor.batch)  # type: ignore[attr-defined]
            raise
        cursor.batch += 1
        if len(items) < want:
            cursor.ended = True
            if not items or (self.drop_last and self.batch_size is not None):
                return None
        return items
