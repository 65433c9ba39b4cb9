"""The user's Sequence as what the Prefetcher loads: its epoch hooks (called in begin/end pairs,
one pair per loaded epoch), its length (``__len__`` or a PyDataset's ``num_batches``), values the
core refuses carried through untouched, an infinite PyDataset as chunks of batches."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

_BASE_HOOK_MODULES = ("keras", "tf_keras", "tensorflow")
_BASE_HOOK_CLASSES = ("PyDataset", "Sequence")


def _user_hook(sequence: Any, name: str) -> Callable[[], Any] | None:
    """``sequence.<name>`` unless it is missing or the no-op of Keras's base class."""
    method = getattr(sequence, name, None)
    if not callable(method):
        return None
    if name in getattr(sequence, "__dict__", {}):  # set on the instance: the user's own
        return method
    func = getattr(type(sequence), name, None)
    module = getattr(func, "__module__", None) or ""
    qualname = getattr(func, "__qualname__", "")
    if module.split(".")[0] in _BASE_HOOK_MODULES and qualname in {
        f"{cls}.{name}" for cls in _BASE_HOOK_CLASSES
    }:
        return None
    return method


class _EpochHooks:
    """Calls the Sequence's epoch hooks in begin/end pairs, one pair per loaded epoch.

    The engine calls :meth:`advance` on the worker that loaded the last batch of an epoch, before
    any batch of the next epoch loads; the consumer calls :meth:`enter` before a Prefetcher starts
    (or restarts) loading, when no engine is running.
    """

    def __init__(self, begin: Callable[[], Any] | None, end: Callable[[], Any] | None) -> None:
        self._begin = begin
        self._end = end
        self._lock = threading.Lock()
        self.current: int | None = None  # the epoch whose on_epoch_begin ran last

    @property
    def active(self) -> bool:
        return self._begin is not None or self._end is not None

    def enter(self, epoch: int) -> None:
        with self._lock:
            if self.current == epoch:
                return
            if self.current is not None and self._end is not None:
                self._end()
            self.current = epoch
            if self._begin is not None:
                self._begin()

    def would_call(self, epoch: int) -> bool:
        """Whether :meth:`enter` of ``epoch`` would call a hook now."""
        if self.current == epoch:
            return False
        return self._begin is not None or (self.current is not None and self._end is not None)

    def advance(self) -> None:
        with self._lock:
            if self._end is not None:
                self._end()
            self.current = 0 if self.current is None else self.current + 1
            if self._begin is not None:
                self._begin()


def _length(sequence: Any) -> int:
    """``len(sequence)``, or the ``num_batches`` of a PyDataset that defines only that."""
    if hasattr(sequence, "__len__"):
        return len(sequence)
    batches = getattr(sequence, "num_batches", None)
    if isinstance(batches, (int, np.integer)) and not isinstance(batches, bool):
        return int(batches)
    raise TypeError(
        f"sequence must have __len__ (or num_batches, the number of batches) and __getitem__, "
        f"got {type(sequence).__name__}"
        + (" whose num_batches is None (an infinite PyDataset)" if batches is None and
           hasattr(sequence, "num_batches") else "")
    )


class _Returned:
    """A value ``__getitem__`` returned that pyloader's core refuses as a batch (None, a generator,
    a coroutine: :class:`~pyloader.Prefetcher` names the index, since such a value is usually a
    bug), carried through untouched instead, as Keras hands on whatever ``__getitem__`` returns:
    iterating the dataset yields it, and Keras's adapter says what a batch must be, as it does on
    its own path. :meth:`~pyloader.keras.PrefetchedDataset._take` unwraps it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _carried(value: Any) -> Any:
    """``value``, or a :class:`_Returned` holding it if the core would refuse it as a batch."""
    if value is None or inspect.isgenerator(value) or inspect.iscoroutine(value):
        return _Returned(value)
    return value


class _Source:
    """What the Prefetcher loads: the user's Sequence, without hooks the engine would call."""

    def __init__(self, sequence: Any) -> None:
        self._sequence = sequence
        _length(sequence)  # checked now: a Sequence without a length fails here, not in a pass

    def __len__(self) -> int:
        return _length(self._sequence)  # read at each epoch's start: it may change between epochs

    def __getitem__(self, index: int) -> Any:
        return _carried(self._sequence[index])


_UNBOUNDED_CHUNK = 1024  # batches of an infinite PyDataset per pyloader epoch


class _Unbounded:
    """An infinite PyDataset as consecutive chunks of ``chunk`` batches, one chunk per pyloader
    epoch (in order): batch ``j`` of epoch ``e`` is the Sequence's batch ``e * chunk + j``, the
    index Keras's ``itertools.count()`` gives it. The engine calls :meth:`on_epoch_end` after the
    last batch of a chunk loaded and before any batch of the next one does (process mode: every
    worker replays it on its copy), so the offset it advances is exact for every load."""

    def __init__(self, sequence: Any, chunk: int = _UNBOUNDED_CHUNK) -> None:
        self._sequence = sequence
        self._chunk = chunk
        self.offset = 0

    def __len__(self) -> int:
        return self._chunk

    def __getitem__(self, index: int) -> Any:
        return _carried(self._sequence[self.offset + index])

    def on_epoch_end(self) -> None:
        self.offset += self._chunk


class _HookedSource(_Source):
    """A :class:`_Source` whose epoch boundaries run the Sequence's hooks (see :class:`_EpochHooks`)."""

    def __init__(self, sequence: Any, hooks: _EpochHooks) -> None:
        super().__init__(sequence)
        self._hooks = hooks

    def on_epoch_end(self) -> None:
        self._hooks.advance()
