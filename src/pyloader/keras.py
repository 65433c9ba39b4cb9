"""Keras 3 adapter: ``model.fit``, ``evaluate`` and ``predict`` on batches pyloader loads ahead.

``prefetch(seq)`` returns a :class:`PrefetchedDataset`, a ``keras.utils.PyDataset`` whose batches
come from a :class:`~pyloader.Prefetcher`. It tells Keras ``workers=1`` and
``use_multiprocessing=False``, so Keras's ``PyDatasetAdapter`` starts no enqueuer of its own and
simply calls ``dataset[i]`` once per step, from a generator it makes for each pass over the data
(``fit`` makes one per epoch, plus one that reads a single batch to build the model).

How a pass maps to Keras: the adapter asks for the indices of ``range(len)``, each once per
generator, shuffled with Python's ``random`` when ``fit(shuffle=True)`` (the default). Loading
ahead means the order cannot be Keras's, which is drawn only when its generator starts; so pyloader
owns the order and ``dataset[i]`` returns the *next* batch of the current pyloader pass, whatever
``i`` is. Each Keras generator is recognised by its frame (the caller of ``__getitem__``, whose
``self`` is the adapter wrapping this dataset), which also gives the adapter's ``shuffle`` flag:

- a new generator starts a new pass, so it gets every batch exactly once; a pass that served only
  one batch (the batch ``fit``/``evaluate`` read to build the model) is rewound instead of
  skipped, and a pass abandoned further in (an early stop, an error) is skipped;
- ``steps_per_epoch < len``: Keras keeps one generator across epochs, and so does the pass;
- the order follows the adapter's flag: seeded shuffle (``(seed, epoch)``, see :mod:`pyloader._plan`)
  for ``fit(shuffle=True)``, exact order for ``evaluate``, ``predict`` and ``fit(shuffle=False)``
  (switching rebuilds the Prefetcher: once at the first ``fit`` of a dataset made with
  ``shuffle=None``, which starts in order, and whenever one dataset serves both);
- Keras's ``get_tf_dataset`` (tensorflow) reads batches 0 and 1 to learn their spec, loading them
  in place at every ``fit``/``evaluate``/``predict`` call on its own path: it gets the first batches
  of the pass its generator gets next (already loaded ahead, in the adapter's order), which that
  generator is served again; if one of them failed, the spec comes from ``seq[0]``, ``seq[1]`` as
  on Keras's path, and the error reaches the generator at that batch's step, as on Keras's path;
- a caller that is not Keras's adapter (your own ``dataset[i]``) gets ``seq[i]``, loaded in place.

The Sequence's ``on_epoch_end`` and ``on_epoch_begin`` are not left to Keras (which calls
``on_epoch_end`` again from every ``reset()``): the engine calls them where loading crosses from one
epoch to the next, after the last batch of an epoch was loaded and before any batch of the next
one is, so that what they change applies to the next epoch as a whole even though it loads ahead.
Each loaded epoch gets one ``on_epoch_begin`` and one ``on_epoch_end``; the epoch loading ahead when
``fit`` returns has begun (and ended too, if it was loaded completely), and a pass that
``steps_per_epoch`` spreads over several Keras epochs is one epoch here. Sequences that define
neither hook (Keras's base class defines no-ops) load across epoch boundaries without waiting.

A Sequence whose ``len()`` changes in ``on_epoch_end`` gets each epoch with its own length (see
:mod:`pyloader.prefetcher`). Keras's generator reads ``len(dataset)`` when it starts, before its
first batch: the pass begins right then, so the generator sees its epoch's length. Keras (3.x,
torch backend) reads the number of steps of ``fit`` only once, though: a shorter epoch ends early
(with Keras's "ran out of data" warning), and one longer than the first is cut to that many steps
by Keras, which then skips the rest of it, as on its own path.

Process mode (``mode="process"``, the default for a PyDataset made with
``use_multiprocessing=True``): the workers are processes, forked (through the Prefetcher's zygote)
from a copy of this process taken when the Prefetcher is made, that run the Sequence's
``__getitem__`` and write the arrays into shared memory; Keras still sees one worker and no
multiprocessing. The hooks run here as above, and every worker replays each ``on_epoch_end``
(with the ``on_epoch_begin`` that follows it) on its own copy of the Sequence before it loads a
batch of the next epoch, so state they change (a reshuffled index list) reaches the workers, and a
worker that dies is replaced by one that replays them all. The hooks a pass runs when it starts
(``on_epoch_begin`` of the first epoch, the pair a :meth:`PrefetchedDataset.set_epoch` calls) run
before the Prefetcher is made again, so that its workers start from what they left. What
``__getitem__`` changes on ``self`` stays in the worker that ran it. The Prefetcher, workers
included, is made again when the order Keras asks for changes (the first ``fit`` after
``prefetch(seq)`` with ``shuffle=None``, then any switch between ``fit`` and ``evaluate``/``predict``);
``dataset.loader.worker_pids()`` lists the current workers.

How this differs from Keras's own calls of the hooks (the one difference, by design): Keras calls
them per iteration it makes (``on_epoch_begin`` before, ``on_epoch_end`` after, plus an
``on_epoch_end`` from ``reset()`` and a pair around the batch it reads to build a model; the
order varies by backend), pyloader where loading crosses epochs, as above. A hook changes what the
next epoch loads (a reshuffled index list), and pyloader loads that epoch while Keras still trains
on this one: calling the hooks at Keras's calls would mean loading nothing of an epoch before
Keras begins it, the bubble at every boundary that loading ahead removes.

Errors: what ``__getitem__`` raised reaches Keras as it is (its type, its traceback), with a note
naming the batch index and worker, so ``fit`` raises what it raises through Keras's own path (on
tensorflow, tf.data makes the same ``tf.errors`` type of it on both paths). A PyDataset's
``max_queue_size`` is pyloader's ``depth``; 0, which Keras takes as an unbounded queue, gives the
default depth, ``2 * workers``.

An infinite PyDataset (``num_batches`` None) is what Keras reads as ``dataset[0]``,
``dataset[1]``... from every new iteration (``steps_per_epoch`` bounds its epochs, one iteration
spans a whole ``fit``): pyloader loads it in order, in chunks of ``_UNBOUNDED_CHUNK`` batches that
are its epochs (see :class:`_Unbounded`), and starts again from batch 0 when Keras makes a new
iteration (the one-batch read that builds a model is rewound as above). It has no epochs to load,
so Keras's own ``on_epoch_begin``/``on_epoch_end`` calls reach it, when Keras makes them.

On the torch backend, numpy batches are handed over as ``torch.from_numpy`` views of pyloader's
buffers, which Keras's ``convert_to_tensor`` passes through (it would copy a numpy array). The other
backends take the numpy batches as they are (jax copies them to its device arrays; tensorflow's
``from_generator`` copies them into tensors), as they take a numpy batch from Keras's own path.
On tensorflow, Keras reads them through a :class:`_KerasFeed` that the dataset gives its adapter as
the enqueuer, so that Keras builds its ``tf.data`` pipeline as for its own enqueuer, without a
second prefetch queue and without tf.data's autotuning (whose thread made ``fit`` return seconds
late); the batches, their order, hooks and errors are those of the generator path.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import numpy as np

try:
    import keras
except ModuleNotFoundError as _exc:  # keras imports its backend on import: say which, and how
    if _exc.name not in ("tensorflow", "jax", "torch"):
        raise
    _backend = os.environ.get("KERAS_BACKEND")
    raise ImportError(
        f"keras could not import its backend, {_exc.name} "
        f"(KERAS_BACKEND={'unset, so tensorflow' if _backend is None else repr(_backend)}). Install "
        f"{_exc.name}, or set KERAS_BACKEND to a backend you have installed: torch, jax or "
        f"tensorflow (pyloader's [keras] extra installs keras alone)"
    ) from _exc

from . import _tree
from ._errors import BatchError, WorkerDiedError, add_note
from .arrays import ArraySequence
from .prefetcher import Prefetcher
from .streams import Stream, is_stream_like

__all__ = ["PrefetchedDataset", "prefetch"]

_DEFAULT_WORKERS = 4  # for a Sequence that is not a Keras PyDataset (which carries its own)
_BASE_HOOK_MODULES = ("keras", "tf_keras", "tensorflow")
_BASE_HOOK_CLASSES = ("PyDataset", "Sequence")
_TORCH_DTYPES = frozenset(
    np.dtype(t)
    for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
              "complex64", "complex128")
)


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
    its own path. :meth:`PrefetchedDataset._take` unwraps it."""

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


def _is_infinite(sequence: Any) -> bool:
    """Whether ``sequence`` is an infinite Keras PyDataset: ``num_batches`` None, or neither
    ``num_batches`` nor ``__len__`` (which Keras's own ``PyDataset.__iter__`` reads without end)."""
    if not isinstance(sequence, keras.utils.PyDataset) or isinstance(sequence, PrefetchedDataset):
        return False
    try:
        return sequence.num_batches is None
    except NotImplementedError:  # PyDataset's num_batches: no __len__ either
        return True


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


_CALLER_DEPTH = 3  # frames searched for Keras's generator (a subclass's __getitem__ adds one)


def _keras_generator(frame: FrameType | None, dataset: Any) -> tuple[FrameType, Any] | None:
    """``(frame, adapter)`` of the Keras adapter generator iterating ``dataset`` that called us.

    Keras's ``PyDatasetAdapter`` reads the dataset from generator methods whose ``self`` is the
    adapter and whose ``self.py_dataset`` is the dataset; that generator's frame identifies one
    pass of Keras over the data. Searches ``frame`` and a few callers; None if none matches.
    """
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_flags & inspect.CO_GENERATOR:
            adapter = frame.f_locals.get("self")
            if getattr(adapter, "py_dataset", None) is dataset:
                return frame, adapter
        frame = frame.f_back
    return None


_TF_DATASET_METHOD = "get_tf_dataset"  # Keras's PyDatasetAdapter method that builds the tf.data pipeline


class _KerasFeed:
    """Keras's enqueuer protocol (``start``, ``stop``, ``is_running``, ``get``) over a
    :class:`PrefetchedDataset`, for Keras's tensorflow path.

    Keras's ``PyDatasetAdapter.get_tf_dataset`` builds a ``tf.data`` pipeline on a generator. For a
    PyDataset without an enqueuer (a PrefetchedDataset tells Keras ``workers=1``) it adds
    ``prefetch(AUTOTUNE)``: a second queue on top of pyloader's, a tf.data thread that takes the
    GIL to read it, and tf.data's autotuning thread, which the iterator's destructor waits for
    (on tensorflow 2.21 up to its next wake-up, seconds after a long epoch: ``fit`` returned 3 to
    26 s late on the gather workload). For an enqueuer, Keras disables tf.data's prefetching,
    threading and autotuning, since the enqueuer loads ahead itself: so does pyloader. The
    dataset gives its adapter this feed as the enqueuer when ``get_tf_dataset`` reads
    ``num_batches`` (before the adapter looks at its enqueuer), and Keras then reads the batches
    from :meth:`get` in the same steps (``_standardize_batch``, the same count per epoch, an
    error raised through the generator): the batches, their order, the hooks and the errors are
    those of the generator path. ``start``/``stop`` (Keras's calls around each epoch) do nothing:
    pyloader's workers run across epochs.
    """

    def __init__(self, dataset: PrefetchedDataset) -> None:
        self._dataset = dataset

    def start(self) -> None:
        """Nothing to start: pyloader's workers already run."""

    def stop(self, drain_queue_and_join: bool = True) -> None:
        """Nothing to stop: pyloader loads across epochs (``close()`` the dataset to stop it)."""

    def is_running(self) -> bool:
        """Whether the dataset is open."""
        return self._dataset._loader is not None

    def get(self) -> Iterator[Any]:
        """The batches of the pass of the Keras generator that iterates this (its caller), one per
        step, for as long as Keras reads (it stops after ``num_batches``)."""
        caller = sys._getframe(1)  # the Keras generator that called next() on this one
        dataset = self._dataset
        while True:
            yield dataset._next_for(caller)

    def __repr__(self) -> str:
        return f"_KerasFeed({self._dataset!r})"


def _keras_spec_read(frame: FrameType | None, dataset: Any) -> Any:
    """The adapter whose ``get_tf_dataset`` reads ``dataset`` from ``frame`` (or a few callers) to
    learn the batches' spec (Keras reads its first ``NUM_BATCHES_FOR_TENSOR_SPEC`` batches, in a
    comprehension), else None."""
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == _TF_DATASET_METHOD:
            adapter = frame.f_locals.get("self")
            return adapter if getattr(adapter, "py_dataset", None) is dataset else None
        frame = frame.f_back
    return None


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


class PrefetchedDataset(keras.utils.PyDataset):
    """A Keras 3 ``PyDataset`` whose batches a :class:`~pyloader.Prefetcher` loads ahead.

    Made by :func:`prefetch`; see the module docstring for how it follows Keras's passes. Keras
    sees ``workers=1``, ``use_multiprocessing=False`` (so it adds no enqueuer); pyloader's own
    settings, its mode (``"thread"`` or ``"process"``) included, are on :attr:`loader`.

    Args:
        sequence: the Sequence to load (see :func:`prefetch`).
        shuffle: ``None`` follows Keras (shuffled for ``fit(shuffle=True)``, in order otherwise);
            ``True``/``False`` force pyloader's order.
        **options: options of :class:`~pyloader.Prefetcher`, resolved by :func:`prefetch`.

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

    def __enter__(self) -> PrefetchedDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        order = {None: "follow Keras", True: "shuffled", False: "in order"}[self._shuffle]
        loader = "closed" if self._loader is None else repr(self._loader)
        return f"PrefetchedDataset({type(self._sequence).__name__}, order={order}, {loader})"


def _prefetched_generator(stream: Stream) -> Iterator[Any]:
    """The stream's batches, as a generator for Keras's generator adapter; what the user's
    generator raised reaches ``fit`` as it is (with a note), as through Keras's own path."""
    with stream:
        batches = iter(stream)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except BatchError as error:
                failed: BatchError | None = error
            else:
                failed = None
            if failed is not None:  # raised outside the handler: no "during handling" chain
                cause = failed.__cause__
                raise failed if cause is None else cause
            yield batch


def _keras_settings(sequence: Any) -> tuple[int | None, bool, int | None]:
    """(workers, use_multiprocessing, max_queue_size) of a Keras 3 PyDataset, else (None, False, None).

    A ``max_queue_size`` of 0 or less, which Keras accepts (its ``queue.Queue`` is then unbounded),
    gives None: pyloader's default depth, ``2 * workers``, a bound that keeps every worker busy.
    """
    if not isinstance(sequence, keras.utils.PyDataset) or isinstance(sequence, PrefetchedDataset):
        return None, False, None
    queue_size = int(sequence.max_queue_size)
    return (max(1, int(sequence.workers)), bool(sequence.use_multiprocessing),
            queue_size if queue_size > 0 else None)


def prefetch(
    sequence: Any,
    *,
    workers: int | None = None,
    depth: int | None = None,
    mode: str | None = None,
    shuffle: bool | None = None,
    seed: int | None = None,
    shard: tuple[int, int] | str | None = None,
    drop_last: bool = False,
    pin: bool | str = "auto",
    timeout: float | None = None,
    max_pool_bytes: int | None = None,
    start_method: str | None = None,
    worker_init_fn: Any = None,
    max_retries: int = 2,
) -> PrefetchedDataset | Iterator[Any]:
    """Wraps a Sequence for ``model.fit``/``evaluate``/``predict``, loaded ahead by pyloader.

    Example::

        ds = pyloader.keras.prefetch(MyPyDataset(...))
        model.fit(ds, epochs=10, validation_data=pyloader.keras.prefetch(val))
        ds.close()

    A PyDataset made with ``use_multiprocessing=True`` is loaded by ``workers`` processes::

        ds = pyloader.keras.prefetch(MyPyDataset(..., workers=4, use_multiprocessing=True))
        assert ds.loader.mode == "process"

    Every epoch of ``fit`` gets every batch exactly once, shuffled by pyloader when ``fit``
    shuffles (its default); ``evaluate`` and ``predict`` get them in order.

    A Python generator (of batches) is read ahead by one worker thread: ``prefetch`` returns a
    generator of the same batches, which ``fit`` takes as it takes yours (give ``steps_per_epoch``
    as you would); loading it with several workers needs shards (:class:`pyloader.Stream`)::

        model.fit(pyloader.keras.prefetch(my_generator()), steps_per_epoch=100, epochs=5)

    Args:
        sequence: ``__len__`` (batches) and ``__getitem__(i)`` (batch ``i``): a Keras 3
            ``PyDataset``/``Sequence``, a tf.keras ``Sequence``, or any such object. Its
            ``on_epoch_begin``/``on_epoch_end`` run once per epoch, where loading crosses epochs.
            Or a generator of batches (see above).
        workers: loading threads, or worker processes in process mode. Default: a PyDataset's
            ``workers``, else 4.
        depth: batches loaded ahead. Default: a PyDataset's ``max_queue_size``, else (and for a
            ``max_queue_size`` of 0, which Keras takes as unbounded) ``2 * workers``.
        mode: ``"thread"``, or ``"process"`` for a ``__getitem__`` that holds the GIL (worker
            processes forked with a copy of the Sequence; see the module docstring). Default:
            ``"process"`` for a PyDataset with ``use_multiprocessing=True``, else ``"thread"``.
        shuffle: ``None`` follows the order Keras asks for; ``True``/``False`` force it.
        seed: seed of the shuffled order; default drawn from Python's ``random`` (which
            ``keras.utils.set_random_seed`` seeds), or 0 when sharded.
        shard: ``(rank, world_size)``, ``"auto"`` or None (see :class:`~pyloader.Prefetcher`).
        drop_last: with ``shard``, drop the uneven tail.
        pin: buffer pinning (see :class:`~pyloader.Prefetcher`).
        timeout: seconds to wait for one batch, or None.
        max_pool_bytes: bound of the buffer pool.
        start_method: process mode: how the worker processes start (``"fork"``, ``"spawn"`` or
            ``"forkserver"``; default fork where it exists).
        worker_init_fn: process mode: called as ``worker_init_fn(worker_id)`` in each new worker
            process, a replacement's too.
        max_retries: process mode: worker deaths tolerated per batch before it fails with
            :class:`~pyloader.WorkerDiedError`.

    Returns:
        a :class:`PrefetchedDataset` (close it, or use it as a context manager, to stop workers);
        for a generator, a generator (its worker stops when it is exhausted or collected).

    Raises:
        TypeError: ``sequence`` has no ``__len__`` or ``__getitem__`` and is no generator, or a
            generator is asked for more than one worker thread.
        ValueError: an option has a bad value (the message shows it).
    """
    if is_stream_like(sequence):  # a generator: one worker thread reads it ahead of fit
        options: dict[str, Any] = {} if mode is None else {"mode": mode}
        return _prefetched_generator(Stream(
            [sequence], workers=workers, depth=depth, pin=pin, timeout=timeout,
            max_pool_bytes=max_pool_bytes, **options,
        ))
    keras_workers, multiprocessing, queue_size = _keras_settings(sequence)
    if workers is None:
        workers = keras_workers if keras_workers is not None else _DEFAULT_WORKERS
    if depth is None:
        depth = queue_size
    if mode is None:
        mode = "process" if multiprocessing else "thread"
    if seed is None and shard is None:
        seed = random.getrandbits(63)
    return PrefetchedDataset(
        sequence, shuffle=shuffle, workers=workers, depth=depth, mode=mode, seed=seed, shard=shard,
        drop_last=drop_last, pin=pin, timeout=timeout, max_pool_bytes=max_pool_bytes,
        start_method=start_method, worker_init_fn=worker_init_fn, max_retries=max_retries,
    )
