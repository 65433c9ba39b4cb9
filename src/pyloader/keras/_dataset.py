"""``PrefetchedDataset``: the ``keras.utils.PyDataset`` a Prefetcher feeds (see :mod:`pyloader.keras`),
and what it hands Keras: batches as the backend takes them, the user's exceptions."""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import keras
import numpy as np

from .. import _tree
from .._closing import Closing
from .._errors import BatchError, WorkerDiedError, add_note
from ..arrays import ArraySequence
from ..prefetcher import Prefetcher
from ._follow import _TF_DATASET_METHOD, _keras_generator, _keras_spec_read, _KerasFeed
from ._sources import (
    _EpochHooks,
    _HookedSource,
    _Returned,
    _Source,
    _Unbounded,
    _user_hook,
)

_TORCH_DTYPES = frozenset(
    np.dtype(t)
    for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
              "complex64", "complex128")
)


def _to_torch(value: Any, from_numpy: Callable[[np.ndarray], Any]) -> Any:
    """numpy leaves as zero-copy torch tensors (dtypes torch lacks stay numpy).

    Any tuple, list or dict (subclasses too) is walked and rebuilt as the plain type, as Keras's
    own conversion would see it.
    """

    def leaf(v: Any) -> Any:
        return from_numpy(v) if isinstance(v, np.ndarray) and v.dtype in _TORCH_DTYPES else v

    return _tree.map_structure(leaf, value, subclasses=True)


def _user_error(error: BatchError) -> BaseException:
    """The exception ``__getitem__`` raised, noted with where it happened, for Keras to raise.

    Keras lets the user's own type through (on tensorflow, tf.data turns it into the ``OpError`` it
    turns that type into whatever feeds it), so the dataset raises the original exception, with
    its original traceback, and not pyloader's :class:`~pyloader.BatchError` wrapper. Errors of
    pyloader's own (a worker process that died) have no original and stay as they are.
    """
    cause = error.__cause__
    if not isinstance(cause, Exception) or isinstance(error, WorkerDiedError):
        return error
    add_note(
        cause,
        f"pyloader: raised by __getitem__({error.index}) of the Sequence, batch index {error.index}, "
        f"on worker {error.worker} (epoch {error.epoch})",
    )
    return cause


def _pyloader_setting(what: str, option: str) -> AttributeError:
    """The error of setting one of Keras's parallelism attributes that pyloader holds fixed."""
    return AttributeError(f"{what}: pass {option} to pyloader.keras.prefetch() instead")


def _is_infinite(sequence: Any) -> bool:
    """Whether ``sequence`` is an infinite Keras PyDataset: ``num_batches`` None, or neither
    ``num_batches`` nor ``__len__`` (which Keras's own ``PyDataset.__iter__`` reads without end)."""
    if not isinstance(sequence, keras.utils.PyDataset) or isinstance(sequence, PrefetchedDataset):
        return False
    try:
        return sequence.num_batches is None
    except NotImplementedError:  # PyDataset's num_batches: no __len__ either
        return True


class PrefetchedDataset(keras.utils.PyDataset, Closing):
    """A Keras 3 ``PyDataset`` whose batches a :class:`~pyloader.Prefetcher` loads ahead.

    Made by :func:`~pyloader.keras.prefetch`; :mod:`pyloader.keras` says how it follows Keras's
    passes. Keras sees ``workers=1``, ``use_multiprocessing=False`` (so it adds no enqueuer);
    pyloader's own settings, its mode (``"thread"`` or ``"process"``) included, are on
    :attr:`loader`.

    Args:
        sequence: the Sequence to load (see :func:`~pyloader.keras.prefetch`).
        shuffle: ``None`` follows Keras (shuffled for ``fit(shuffle=True)``, in order otherwise);
            ``True``/``False`` force pyloader's order.
        **options: options of :class:`~pyloader.Prefetcher`, resolved by :func:`~pyloader.keras.prefetch`.

    Raises:
        TypeError: ``sequence`` has no ``__len__`` or ``__getitem__``.
        ValueError: an option has a bad value.
    """

    _spec: list[Any]
    _replay: list[Any]
    _deferred: Exception | None

    def __init__(self, sequence: Any, *, shuffle: bool | None, **options: Any) -> None:
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=1)
        self._loader: Prefetcher | None = None  # until construction succeeds (close() checks it)
        if shuffle is not None and not isinstance(shuffle, (bool, np.bool_)):
            raise ValueError(f"shuffle must be None (follow Keras), True or False, got {shuffle!r}")
        self._shuffle = None if shuffle is None else bool(shuffle)
        if not hasattr(sequence, "__getitem__"):
            hint = ""
            if inspect.isgenerator(sequence) or isinstance(sequence, Iterator):
                hint = (": a generator or iterator has no batch index to load ahead by; pass it to "
                        "fit() as it is, or make it a PyDataset (__len__ and __getitem__(i))")
            raise TypeError(
                f"sequence must have __getitem__ (batch i) and __len__, got {type(sequence).__name__}{hint}"
            )
        self._sequence = sequence
        self._source: Any
        self._infinite = _is_infinite(sequence)
        if self._infinite:  # Keras reads it in order, from batch 0 at every new iteration
            self._hooks = _EpochHooks(None, None)  # Keras's own calls reach it (see on_epoch_end)
            self._source = _Unbounded(sequence)
            self._shuffle = False
        elif isinstance(sequence, ArraySequence):  # gathered natively, told the epoch by the engine
            self._hooks = _EpochHooks(None, None)
            self._source = sequence
        else:
            self._hooks = _EpochHooks(_user_hook(sequence, "on_epoch_begin"), _user_hook(sequence, "on_epoch_end"))
            self._source = _HookedSource(sequence, self._hooks) if self._hooks.active else _Source(sequence)
        self._options = options
        self._loader = Prefetcher(self._source, shuffle=bool(self._shuffle), **options)
        self._options["seed"] = self._loader.state_dict()["seed"]  # every rebuild keeps the order
        # Process mode: the workers are forked (through the zygote) when the Prefetcher is made,
        # and only the hooks the engine runs are replayed in them; see _open().
        self._process = self._loader.mode == "process"
        self._from_numpy: Callable[[np.ndarray], Any] | None = None
        if keras.backend.backend() == "torch":
            import torch

            self._from_numpy = torch.from_numpy
        self._reset_stream(enter=True)
        self._frame: FrameType | None = None  # the Keras generator being served
        self._numpy_targets = False
        self._warned_order = False

    # ---- what Keras reads ----------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """1: Keras must not start workers of its own (pyloader's are ``loader.workers``)."""
        return 1

    @workers.setter
    def workers(self, value: int) -> None:
        raise _pyloader_setting(f"Keras's workers of a pyloader dataset stay 1 (got {value!r})", "workers=")

    @property
    def use_multiprocessing(self) -> bool:
        """False: Keras must not start processes of its own (pyloader's are ``loader.worker_pids()``,
        in process mode)."""
        return False

    @use_multiprocessing.setter
    def use_multiprocessing(self, value: bool) -> None:
        raise _pyloader_setting(
            f"Keras's use_multiprocessing of a pyloader dataset stays False (got {value!r})", "mode="
        )

    @property
    def max_queue_size(self) -> int:
        """pyloader's depth (batches loaded ahead); Keras has no queue of its own here."""
        return self.loader.depth

    @max_queue_size.setter
    def max_queue_size(self, value: int) -> None:
        raise _pyloader_setting(f"max_queue_size of a pyloader dataset is pyloader's depth (got {value!r})", "depth=")

    def __len__(self) -> int:
        """Batches per epoch (for this shard): of the current pass, or else of the next one.

        Keras's adapter reads it when one of its generators starts, before it asks for a batch:
        the pass that generator gets begins then, so that the length is that pass's epoch's (a
        Sequence's length may change between epochs).

        Raises:
            TypeError: the Sequence is infinite (its ``num_batches`` is None).
        """
        if self._infinite:
            raise TypeError("an infinite PyDataset has no len(): its num_batches is None")
        found = _keras_generator(sys._getframe(1), self)
        if found is None:
            return len(self.loader)
        if found[0] is not self._frame:
            self._enter(*found)
        if (not self._rewind and self._deferred is None
                and (self._pass is None or self._served >= self._pass_length)):
            self._start_pass()
        return self._pass_length

    @property
    def num_batches(self) -> int | None:
        """``len(self)``, or None for an infinite PyDataset (Keras then reads batches 0, 1, 2...).

        Read by Keras's ``get_tf_dataset`` (tensorflow backend), it also gives that adapter a
        :class:`_KerasFeed` as its enqueuer, before the adapter decides how to build its
        ``tf.data`` pipeline (see :class:`_KerasFeed`).
        """
        caller = sys._getframe(1)
        if caller.f_code.co_name == _TF_DATASET_METHOD:
            adapter: Any = caller.f_locals.get("self")
            if (getattr(adapter, "py_dataset", None) is self
                    and getattr(adapter, "enqueuer", False) is None):
                adapter.enqueuer = _KerasFeed(self)
        return None if self._infinite else len(self)

    def __getitem__(self, index: int) -> Any:
        """The next batch of the current pass when Keras's adapter asks, else ``seq[index]``.

        Raises:
            Exception: what the Sequence's ``__getitem__`` raised for that batch, as Keras lets it
                through, with a note naming the batch index and worker (pyloader's
                :class:`~pyloader.WorkerDiedError` when worker processes died on it).
            pyloader.EpochEndError: the Sequence's ``on_epoch_end``/``on_epoch_begin`` raised.
        """
        caller = sys._getframe(1)
        if caller is not self._frame:
            found = _keras_generator(caller, self)
            if found is None:
                adapter = None if self._infinite else _keras_spec_read(caller, self)
                if adapter is None:
                    return self._sequence[index]
                return self._for_keras(self._spec_read(adapter, index))
            if found[0] is not self._frame:
                self._enter(*found)
        return self._for_keras(self._take())

    def _spec_read(self, adapter: Any, index: int) -> Any:
        """Batch ``index`` of the ``index + 1`` Keras's ``get_tf_dataset`` reads to learn the spec.

        They are the first batches of the pass the adapter's generator gets next (loaded ahead by
        pyloader, not read again in place): the read starts that pass as the generator would (in
        the adapter's order), and the generator is served them again (see :meth:`_begin_pass`).
        """
        if self._deferred is not None:  # an earlier batch of this read failed: as Keras reads
            return self._sequence[index]
        if index == 0 or index != len(self._spec):  # a new read: position the pass
            self._frame = None
            self._begin_pass(bool(getattr(adapter, "shuffle", False)))
            self._spec = []
        try:
            batch = self._take()
        except Exception as error:  # noqa: BLE001 - raised where the generator reaches it
            # Keras's own spec read reads batches 0, 1 in place and meets a failing batch later,
            # in its generator (on tensorflow, as tf.data's error type): so does the generator
            # here, at this batch's step; the spec comes from an in-place read, as Keras's does.
            self._deferred = error
            return self._sequence[index]
        self._spec.append(batch)
        return batch

    def _next_for(self, caller: FrameType | None) -> Any:
        """The next batch for the Keras generator whose frame is ``caller`` (a :class:`_KerasFeed`
        reads for it): the first read of a new generator starts its pass, as in ``__getitem__``."""
        if caller is not self._frame:
            found = _keras_generator(caller, self)
            if found is None:
                raise RuntimeError("pyloader: the batches of a PrefetchedDataset's Keras feed are "
                                   "read by Keras's PyDatasetAdapter only")
            if found[0] is not self._frame:
                self._enter(*found)
        return self._for_keras(self._take())

    def __iter__(self) -> Iterator[Any]:
        """One pass of numpy batches, prefetched, in order unless ``shuffle=True`` was given
        (an infinite PyDataset: batches 0, 1, 2... without end)."""
        self._frame = None
        self._begin_pass(False, from_keras=False)
        if self._infinite:
            while True:
                yield self._take()
        for _ in range(len(self)):
            yield self._take()

    def on_epoch_begin(self) -> None:
        """Ignored: pyloader calls the Sequence's ``on_epoch_begin`` itself, when epochs load
        (an infinite PyDataset, which has no epochs to load, gets Keras's call)."""
        if self._infinite:
            self._sequence.on_epoch_begin()

    def on_epoch_end(self) -> None:
        """Ignored: pyloader calls the Sequence's ``on_epoch_end`` itself, when epochs load
        (an infinite PyDataset, which has no epochs to load, gets Keras's call)."""
        if self._infinite:
            self._sequence.on_epoch_end()

    # ---- passes --------------------------------------------------------------------------------

    def _enter(self, frame: FrameType, adapter: Any) -> None:
        """A new Keras generator (``frame``, of ``adapter``) starts iterating this dataset."""
        self._frame = frame
        # With class_weight, Keras reads y back to numpy: leave y as it is for that.
        self._numpy_targets = getattr(adapter, "class_weight", None) is not None
        self._begin_pass(bool(getattr(adapter, "shuffle", False)))
        self._spec = []  # served again (above), or abandoned with the rest of their pass

    def _reset_stream(self, *, enter: bool) -> None:
        self._pass: Iterator[Any] | None = None
        self._pass_length = 0  # its batches: len(loader) when it began (the next one's may differ)
        self._served = 0  # batches of the current pass handed out
        self._stream_served = 0  # batches handed out since the Prefetcher (re)started
        self._first: Any = None  # its first batch, kept until the second is taken (rewind)
        self._rewind = False
        self._spec = []  # the batches of this pass a spec read took (see _spec_read)
        self._replay = []  # batches to serve again before the pass goes on
        self._deferred = None  # what a spec read met, raised after _replay
        if enter:
            self._needs_enter = True  # the next pass starts a (re)started engine: call the hooks

    def _begin_pass(self, keras_shuffle: bool, *, from_keras: bool = True) -> None:
        """A new consumer iteration starts: position the stream at the start of a pass."""
        loader = self.loader
        if self._infinite:  # Keras starts every iteration from batch 0
            if self._served == 1 and self._first is not None and self._stream_served == 1:
                self._served, self._rewind = 0, True  # the peek: serve its batch again
            elif self._stream_served:
                self._open(False, 0)
            return
        want = keras_shuffle if self._shuffle is None else self._shuffle
        if from_keras and self._shuffle and not keras_shuffle and not self._warned_order:
            self._warned_order = True
            warnings.warn(
                "Keras iterates this dataset in order (evaluate/predict), but it was made with "
                "shuffle=True: it gets pyloader's shuffled order, so predict() rows do not follow "
                "the Sequence; use shuffle=None to follow Keras",
                UserWarning,
                stacklevel=3,
            )
        if loader.shuffle != want:
            self._rebuild(want)
        elif self._deferred is not None or (
            self._spec and self._served == len(self._spec) and not self._replay
        ):  # only a spec read took from this pass: its batches are served again, then the rest
            self._replay, self._spec, self._served = self._spec, [], 0
        elif 0 < self._served < self._pass_length:
            if self._served == 1 and self._first is not None:
                self._served, self._rewind = 0, True  # a peek: serve its batch again
            else:
                self._pass = None  # abandoned: the next iter() skips the rest of it

    def _rebuild(self, shuffle: bool) -> None:
        state = self.loader.state_dict()
        epoch = state["epoch"] + (1 if state["batches_consumed"] else 0)
        if self._hooks.current is not None:  # an epoch loaded ahead already had its hooks run
            epoch = max(epoch, self._hooks.current)
        self._open(shuffle, epoch)

    def _open(self, shuffle: bool, epoch: int) -> None:
        """Replaces the Prefetcher with a new one whose next pass is ``epoch``.

        Process mode: the new workers start from a copy of the Sequence taken now and replay only
        the hooks their engine runs; so the hooks :meth:`_EpochHooks.enter` calls when the pass
        starts (``on_epoch_begin`` of the first epoch, the pair of a :meth:`set_epoch`) run here,
        before the copy is taken, or what they change would never reach the workers.
        """
        old, self._loader = self._loader, None
        if old is not None:
            old.close()
        if self._infinite:  # its workers are joined: no load reads the offset now
            self._source.offset = 0
        error: BaseException | None = None
        entered = False
        if self._process and self._hooks.would_call(epoch):
            entered = True
            try:
                self._hooks.enter(epoch)
            except BaseException as exc:  # raised once the dataset is usable again (as in _take)
                error = exc
        loader = Prefetcher(self._source, shuffle=shuffle, **self._options)
        try:
            loader.set_epoch(epoch)
        except BaseException:
            loader.close()
            raise
        self._loader = loader
        self._reset_stream(enter=error is not None or not entered)  # a failed hook: retried as in _take
        if error is not None:
            raise error

    def _take(self) -> Any:
        if self._rewind:
            self._rewind = False
            self._served = 1
            return self._first
        if self._replay:  # taken from the pass already (which may have ended with them)
            batch = self._replay.pop(0)
            self._served += 1
            self._stream_served += 1
            self._first = batch if self._served == 1 else None
            return batch
        if self._deferred is not None:  # met by a spec read after the batches just replayed
            deferred, self._deferred = self._deferred, None
            self._pass, self._served, self._first = None, 0, None
            raise deferred
        if self._pass is None or self._served >= self._pass_length:
            self._start_pass()
        assert self._pass is not None
        n = self._pass_length
        try:
            batch = next(self._pass)
        except BatchError as error:
            failed: BatchError | None = error
        else:
            failed = None
        if failed is not None:  # raised outside the handler: no "during handling" chain
            self._pass, self._served, self._first = None, 0, None
            raise _user_error(failed)
        if type(batch) is _Returned:
            batch = batch.value
        self._served += 1
        self._stream_served += 1
        self._first = batch if self._served == 1 else None
        if self._served == n:
            next(self._pass, None)  # ends the pass: raises EpochEndError if a hook failed
        return batch

    def _start_pass(self) -> None:
        loader = self.loader
        if self._needs_enter:
            if self._process and self._hooks.would_call(loader.epoch):
                self._open(loader.shuffle, loader.epoch)  # the hooks, then new workers
                loader = self.loader
            else:
                self._hooks.enter(loader.epoch)
                self._needs_enter = False
        self._pass = iter(loader)
        self._pass_length = len(loader)  # the epoch iter() began: its length, read at its start
        self._served = 0

    def _for_keras(self, batch: Any) -> Any:
        from_numpy = self._from_numpy
        if from_numpy is None:
            return batch
        if isinstance(batch, np.ndarray):  # Keras would make it (x,): keep that, as a tensor
            return (_to_torch(batch, from_numpy),)
        if self._numpy_targets and isinstance(batch, (tuple, list)) and len(batch) == 2:
            return (_to_torch(batch[0], from_numpy), batch[1])
        return _to_torch(batch, from_numpy)

    # ---- pyloader ------------------------------------------------------------------------------

    @property
    def loader(self) -> Prefetcher:
        """The :class:`~pyloader.Prefetcher` that loads the batches (it may be rebuilt when the
        order Keras asks for changes)."""
        if self._loader is None:
            raise RuntimeError("this PrefetchedDataset is closed")
        return self._loader

    def stats(self) -> dict[str, Any]:
        """The Prefetcher's per-epoch figures (see :meth:`pyloader.Prefetcher.stats`)."""
        return self.loader.stats()

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass epoch ``epoch`` (of the shuffled order), e.g. with ``initial_epoch``.

        Args:
            epoch: the epoch number, >= 0.
        """
        self.loader.set_epoch(epoch)
        self._reset_stream(enter=True)

    def close(self) -> None:
        """Stops and joins pyloader's workers. Idempotent."""
        loader, self._loader = getattr(self, "_loader", None), None
        self._frame = None
        if loader is not None:
            loader.close()

    def __repr__(self) -> str:
        order = {None: "follow Keras", True: "shuffled", False: "in order"}[self._shuffle]
        loader = "closed" if self._loader is None else repr(self._loader)
        return f"PrefetchedDataset({type(self._sequence).__name__}, order={order}, {loader})"
