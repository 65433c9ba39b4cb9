"""The DataLoader and its iterator: torch's epochs, drawn in the consumer, loaded by a Prefetcher.

:class:`DataLoader` is torch's class with torch's constructor; what it adds is where the batches
come from. Each ``iter()`` draws the epoch exactly as torch's iterator does (sampler, then the
workers' ``base_seed`` from the generator, then the index batches) into a :class:`_Plan`, and a
:class:`_LoaderIter` loads that plan on a :class:`~pyloader.Prefetcher` (a pass of
:class:`~._batching._EpochBatches`, or natively gathered :class:`~._batching._OrderedArrays`),
turning each delivered batch into torch's (:mod:`._codec`). A batch the native stack refuses is
collated again in the consumer by torch's ``default_collate`` (:meth:`_LoaderIter._recover`), so
the result, or the error, is torch's; a failed batch raises the user's own exception with a note
(:meth:`_LoaderIter._user_error`), as torch re-raises the type. :meth:`DataLoader.state_dict` is
the rest of a plan plus the generator's state. The package docstring (:mod:`pyloader.torch`)
describes the behaviour as a user sees it: the modes (what ``"auto"`` picks, what threads change),
errors, persistent workers, distributed sharding.
"""

from __future__ import annotations

import functools
import reprlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate, default_convert
from torch.utils.data._utils.pin_memory import pin_memory as _torch_pin_memory
from torch.utils.data.dataloader import (
    _get_distributed_settings,
    _sharding_worker_init_fn,
    _share_dist_seed,
)
from torch.utils.data.datapipes.datapipe import IterDataPipe, MapDataPipe
from torch.utils.data.graph_settings import apply_random_seed, apply_sharding

from .. import _C, _checks
from .._errors import BatchError, WorkerDiedError, add_note
from ..prefetcher import Prefetcher
from ..process import UnpicklableError
from ..streams import Stream
from ._batching import (
    _COLLATE,
    _CONVERT,
    _CUSTOM,
    _STACK,
    _array_columns,
    _EpochBatches,
    _OrderedArrays,
    _ProcessWorkerInit,
    _SampleFailure,
    _worker_seed,
    _WorkerInit,
)
from ._codec import _collated, _converted, _unpack
from ._iterable import stream_parts

_STATE_VERSION = 1
_MODES = ("auto", "thread", "process")
_T_co = TypeVar("_T_co", covariant=True)


class StackFallbackWarning(UserWarning):
    """The native collation refused a batch that torch's ``default_collate`` accepts; the batch was
    collated by torch in the consumer thread (correct, but slower)."""


def _distributed() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            return dist.get_rank(), world
    return None


class DataLoader(torch.utils.data.DataLoader[_T_co]):
    """``torch.utils.data.DataLoader``, loaded ahead by pyloader's native threads or worker processes.

    A subclass of torch's DataLoader whose constructor *is* torch's: every argument has torch's
    meaning, default and checks (raised by torch's own code, so the messages are torch's), and the
    attributes (``sampler``, ``batch_sampler``, ``collate_fn``...) are the ones torch sets. With the
    default ``mode="auto"`` the workers are processes whenever torch's are, so code written for
    torch gets torch's batches, worker state, seeds and errors; what differs, and what
    ``mode="thread"`` changes, is in the module docs (:mod:`pyloader.torch`). It is ``Generic`` as
    torch's is (``DataLoader[T]`` in annotations).

    Args:
        dataset: a map-style dataset (``__getitem__`` and, for the default samplers, ``__len__``),
            or an ``IterableDataset``: each worker process iterates its own copy (which may shard
            itself with ``get_worker_info()``) and batches its items, and the batches arrive
            round-robin over the workers, as torch's (a :class:`~pyloader.Stream` of the workers).
        batch_size: samples per batch; ``None`` disables auto-batching (a dataset of batches).
        shuffle: reshuffle every epoch (a ``RandomSampler`` drawing from ``generator``).
        sampler: the order of the sample indices (opts out of automatic distributed sharding).
        batch_sampler: the batches of indices (excludes ``batch_size``, ``shuffle``, ``sampler``,
            ``drop_last``).
        num_workers: worker processes (threads with ``mode="thread"``); ``0`` means one worker
            thread in this process, as torch loads in the main process (``mode="process"``: one
            worker process).
        collate_fn: turns a list of samples into a batch; runs in the worker. ``None``: torch's
            ``default_collate`` (done natively), or ``default_convert`` when ``batch_size=None``.
        pin_memory: pin the slot buffers (``cudaHostRegister``) when an accelerator is present.
        drop_last: drop the last partial batch.
        timeout: seconds to wait for one batch (``0``: forever).
        worker_init_fn: called as ``worker_init_fn(worker_id)`` in each new worker process, after
            torch's seeding and ``get_worker_info()`` are set up (a replaced worker's successor
            too), or once in each worker thread with ``mode="thread"``; never with
            ``num_workers=0`` in auto or thread mode (torch: no workers, no call).
        multiprocessing_context: checked as torch does; how the worker processes start
            (``"fork"``, ``"spawn"``, ``"forkserver"``, or a context object whose
            ``get_start_method()`` says it; ``None``: fork where it exists). Unused by threads.
        generator: draws the shuffle (and the ``base_seed`` torch draws for its workers).
        prefetch_factor: batches loaded ahead per worker (default 2).
        persistent_workers: keep the workers (threads or processes) from pass to pass, as torch
            does (see the module docs); the ``base_seed`` is drawn once, as torch does.
        pin_memory_device: deprecated in torch (warns as torch does).
        in_order: accepted; pyloader always delivers in order (``False`` lets torch reorder).
        mode: pyloader's worker kind: ``"auto"`` (processes when ``num_workers > 0``, as torch),
            ``"process"`` or ``"thread"`` (see the module docs).

    Raises:
        ValueError, TypeError: the argument combinations torch rejects, with torch's messages;
            ``ValueError`` for a ``mode`` that is not ``"auto"``, ``"thread"`` or ``"process"``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Sampler | Iterable | None = None,
        batch_sampler: Sampler | Iterable | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], Any] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        mode: str = "auto",
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self._ready = False  # torch's constructor checks the worker count before we know our kind
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn,
            pin_memory, drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device, in_order=in_order,
        )
        self._auto_shard: DistributedSampler | None = None
        self._iterable = isinstance(self.dataset, IterableDataset)
        if self._auto_collation:
            self._kind = _STACK if self.collate_fn is default_collate else _COLLATE
        else:
            self._kind = _CONVERT if self.collate_fn is default_convert else _CUSTOM
        if self._iterable:
            if mode == "thread" and num_workers > 0:
                warnings.warn(
                    "pyloader.torch.DataLoader(mode='thread'): an IterableDataset is loaded by worker "
                    "processes all the same: each worker's copy of the dataset needs its own "
                    "get_worker_info() (to shard itself), which torch keeps per process, so threads "
                    "would each read the whole dataset",
                    UserWarning,
                    stacklevel=2,
                )
            self._epoch = 0
            self._drew_base_seed = False
            self._native_ok = False
            self._kept_stream: Stream | None = None  # persistent_workers: the Stream every pass reads
            self._current_stream: weakref.ref[_IterableIter] | None = None
            self._ready = True
            self.check_worker_number_rationality()
            return

        if sampler is None and batch_sampler is None and (shard := _distributed()) is not None:
            # Automatic sharding: the default sampler becomes a DistributedSampler (torch's frozen
            # attributes are set past its guard, once, here).
            rank, world = shard
            seed = generator.initial_seed() if generator is not None else 0
            self._auto_shard = DistributedSampler(
                self.dataset, num_replicas=world, rank=rank, shuffle=bool(shuffle), seed=seed,
                drop_last=drop_last,
            )
            object.__setattr__(self, "sampler", self._auto_shard)
            if self.batch_size is not None:
                object.__setattr__(self, "batch_sampler", BatchSampler(self._auto_shard, self.batch_size, drop_last))

        s = self.sampler
        self._native_ok = (
            self._kind is _STACK and batch_sampler is None and worker_init_fn is None
            and self._auto_shard is None and getattr(s, "data_source", None) is self.dataset
            and (type(s) is SequentialSampler
                 or (type(s) is RandomSampler and not s.replacement and s._num_samples is None))
        )
        self._epoch = 0  # the epoch the next pass will be
        self._auto_epoch_set: int | None = None
        self._drew_base_seed = False
        self._pending: tuple[int, int, list[Any]] | None = None  # a loaded state: (epoch, consumed, rest)
        self._current: weakref.ref[_LoaderIter] | None = None
        # persistent_workers: the Prefetcher whose workers every pass reuses, with its batch kind
        self._kept: tuple[str, Prefetcher] | None = None
        self._warned_fallback = False
        self._ready = True
        self.check_worker_number_rationality()  # torch's check, where torch's __init__ makes it

    def _processes(self) -> bool:
        """Do the passes that call the dataset run it in worker processes? ``mode="auto"``: yes
        whenever ``num_workers > 0``, as torch's workers are processes (see the module docs)."""
        return self.mode == "process" or (self.num_workers > 0 and (self.mode == "auto" or self._iterable))

    def check_worker_number_rationality(self) -> None:
        """torch's warning about more worker processes than CPUs, when pyloader starts worker
        processes (as torch, on construction and on every ``iter()``); never for worker threads,
        which are no processes (pyloader's :class:`~pyloader.Prefetcher` warns on absurd counts)."""
        if self._ready and self._processes() and not (self._native_ok and self._native_columns() is not None):
            super().check_worker_number_rationality()

    # -- epochs ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """One epoch of batches, torch's, in torch's order."""
        if self._iterable:
            return self._iter_stream()
        if self.num_workers == 0 and self.timeout != 0:  # torch's _SingleProcessDataLoaderIter
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        if self.num_workers > 0:
            self.check_worker_number_rationality()
        self._warn_pinning()
        if self._pending is not None:
            epoch, consumed, rest = self._pending
            self._pending = None
            plan: _Plan = _Plan(rest, None, consumed)
        else:
            epoch = self._sync_auto_epoch()
            plan = self._draw()
        self._epoch = epoch + 1
        previous = self._current() if self._current is not None else None
        if previous is not None and (self._processes() or self._kept is not None):
            previous._retire()  # its worker processes end (or its persistent workers move on)
        it = _LoaderIter(self, epoch, plan)
        self._current = weakref.ref(it)
        return it

    def _iter_stream(self) -> _IterableIter:
        """One pass over an IterableDataset: a Stream of torch's workers (:mod:`._iterable`)."""
        if self.num_workers == 0 and self.timeout != 0:  # torch's _SingleProcessDataLoaderIter
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        if self.num_workers > 0:
            self.check_worker_number_rationality()
        self._warn_pinning()
        previous = self._current_stream() if self._current_stream is not None else None
        if previous is not None:
            previous._retire()
        dataset = self.dataset
        datapipe = isinstance(dataset, IterDataPipe)
        reuse_workers = self.persistent_workers and self.num_workers > 0 and self._drew_base_seed
        if datapipe:
            # torch's iterator seeds a DataPipe graph (its shufflers) from the generator at every
            # pass, first: the workers need the newly seeded graph, so no Stream is kept (a
            # persistent one is remade with the same base_seed, as torch's workers keep theirs).
            shared_seed = _share_dist_seed(self.generator, None)
            dataset = apply_random_seed(dataset, torch.Generator().manual_seed(shared_seed))
            self._drop_kept_stream()
        stream = self._kept_stream
        if stream is None:
            if not (datapipe and reuse_workers):
                # torch's iterator draws base_seed from the generator (once, with persistent workers).
                self._base_seed = torch.empty((), dtype=torch.int64).random_(generator=self.generator).item()
                self._drew_base_seed = True
                if datapipe and self.num_workers > 0:
                    # torch's worker iterator then draws a shared seed once more (its _reset(first_iter=
                    # True)), which its workers, started with the first one, never use.
                    _share_dist_seed(self.generator, None)
            stream = self._make_stream(dataset, self._epoch)
            if self.persistent_workers and not datapipe:
                self._kept_stream = stream
        it = _IterableIter(self, self._epoch, stream)
        self._epoch += 1
        self._current_stream = weakref.ref(it)
        return it

    def _drop_kept_stream(self) -> None:
        kept, self._kept_stream = self._kept_stream, None
        if kept is not None:
            kept.close()

    def _make_stream(self, dataset: Any, epoch: int) -> Stream:
        process = self._processes()
        workers = max(1, self.num_workers)
        shards, collate = stream_parts(dataset, self._kind, self.collate_fn, workers)
        options: dict[str, Any] = {}
        init_fn = self.worker_init_fn
        if isinstance(dataset, (IterDataPipe, MapDataPipe)):  # torch shards a DataPipe graph itself
            world_size, rank = _get_distributed_settings()
            if process:
                init_fn = functools.partial(_sharding_worker_init_fn, init_fn, world_size, rank)
            else:
                apply_sharding(dataset, world_size, rank)
        if process:
            options = dict(
                start_method=_start_method(self),
                worker_init_fn=_ProcessWorkerInit(init_fn, workers, dataset, self._base_seed),
            )
        pin = self._pin_device()
        try:
            return Stream(
                shards,
                batch_size=self.batch_size if self._kind in (_STACK, _COLLATE) else None,
                drop_last=self.drop_last,
                collate=collate,
                seed=_worker_seed(self._base_seed, epoch, 0),
                workers=workers,
                depth=max(1, (self.prefetch_factor or 2) * workers),
                pin="cuda" if pin == "cuda" and torch.cuda.is_available() else False,
                timeout=self.timeout if self.timeout > 0 else None,
                mode="process" if process else "thread",
                **options,
            )
        except UnpicklableError as exc:
            clearer = _unpicklable(self, options["start_method"]) if options else None
            if clearer is not None:
                raise clearer from exc
            raise

    def _drop_kept(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[1].close()

    def _sync_auto_epoch(self) -> int:
        """The epoch of the next pass; sets it on the automatic DistributedSampler."""
        epoch = self._epoch
        sampler = self._auto_shard
        if sampler is not None:
            if self._auto_epoch_set is not None and sampler.epoch != self._auto_epoch_set:
                epoch = self._epoch = sampler.epoch  # the user called loader.sampler.set_epoch()
            sampler.set_epoch(epoch)
            self._auto_epoch_set = epoch
        return epoch

    def _draw(self) -> _Plan:
        """Draws an epoch's indices exactly as torch's iterator does, in the same order."""
        native = self._native_columns()
        index_sampler = self._index_sampler
        # torch: iter(index_sampler) in _BaseDataLoaderIter.__init__, then base_seed from the
        # generator (not again on a persistent iterator's reset), then the indices as loading asks.
        sampler_iter = iter(self.sampler if native is not None else index_sampler)
        if not (self.persistent_workers and self.num_workers > 0 and self._drew_base_seed):
            self._base_seed = torch.empty((), dtype=torch.int64).random_(generator=self.generator).item()
            self._drew_base_seed = True
        if native is not None:
            order = None if type(self.sampler) is SequentialSampler else np.fromiter(sampler_iter, np.int64)
            return _Plan(None, native, 0, order=order)
        return _Plan(list(sampler_iter), None, 0)

    def _native_columns(self) -> tuple[list[np.ndarray], bool] | None:
        if not self._native_ok:
            return None
        columns = _array_columns(self.dataset)
        if columns is None or len(columns[0][0]) == 0:
            return None
        return columns

    def _warn_pinning(self) -> None:
        # torch's _BaseDataLoaderIter.__init__ warnings, verbatim.
        if self.pin_memory and self.pin_memory_device:
            warnings.warn(
                "pin_memory_device is deprecated, the current accelerator will be used as the device,"
                f"ignore pin_memory_device='{self.pin_memory_device}'.",
                stacklevel=3,
            )
        if self.pin_memory and not torch.accelerator.is_available():
            warnings.warn(
                "'pin_memory' argument is set as true but no accelerator is found, "
                "then device pinned memory won't be used.",
                stacklevel=3,
            )

    def _pin_device(self) -> str | None:
        if not self.pin_memory or not torch.accelerator.is_available():
            return None
        acc = torch.accelerator.current_accelerator()
        if acc is None or acc.type == "mps":
            return None
        return acc.type

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass epoch ``epoch`` (and calls ``set_epoch`` on a sampler that has it).

        A state loaded with :meth:`load_state_dict` for this same epoch is kept: the pass resumes.
        """
        epoch = _checks.whole("epoch", epoch, 0)
        if self._pending is not None and self._pending[0] != epoch:
            self._pending = None
        self._epoch = epoch
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if s is not None and s is not self._auto_shard and callable(getattr(s, "set_epoch", None)):
                s.set_epoch(epoch)
        if self._auto_shard is not None:
            self._auto_shard.set_epoch(epoch)
            self._auto_epoch_set = epoch

    @property
    def epoch(self) -> int:
        """The epoch the next pass will be (the last pass was ``epoch - 1``)."""
        return self._epoch

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands: a new DataLoader over the same dataset that loads it yields
        exactly the batches this one would yield next (the rest of this epoch, then the next).

        It holds the epoch, the batches consumed, the indices of the rest of the current epoch,
        and the ``generator``'s state (the next epochs' draws). Without a ``generator`` torch draws
        from its global generator: save and restore ``torch.get_rng_state()`` with your model.
        """
        if self._iterable:
            raise TypeError("state_dict() needs a map-style dataset: an IterableDataset's position is its own "
                            "(pyloader.Stream resumes streams of shards)")
        it = self._current() if self._current is not None else None
        if self._pending is not None:
            epoch, consumed, rest = self._pending
        elif it is not None and not it.finished and it.remaining():
            epoch, consumed, rest = it.epoch, it.yielded, it.remaining()
        elif it is not None and not it.finished:  # every batch was yielded: the next epoch is next
            epoch, consumed, rest = it.epoch + 1, 0, None
        else:
            epoch, consumed, rest = self._epoch, 0, None
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "remaining": rest,
            "generator": None if self.generator is None else self.generator.get_state(),
            "base_seed_drawn": self._drew_base_seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state_dict`: the next pass resumes where that one stopped.

        Raises:
            ValueError: not a state of this version, or a generator state without a generator.
        """
        if self._iterable:
            raise TypeError("load_state_dict() needs a map-style dataset: an IterableDataset's position is its "
                            "own (pyloader.Stream resumes streams of shards)")
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a pyloader.torch DataLoader state_dict (version {_STATE_VERSION}): {state!r}")
        epoch, consumed, rest = state["epoch"], state["batches_consumed"], state["remaining"]
        if state.get("generator") is not None:
            if self.generator is None:
                raise ValueError(
                    "the state_dict holds a generator state but this DataLoader has generator=None: "
                    "pass a torch.Generator, as the saved DataLoader had"
                )
            self.generator.set_state(state["generator"])
        self._drew_base_seed = bool(state.get("base_seed_drawn", False))
        self._pending = None if rest is None else (int(epoch), int(consumed), list(rest))
        self._epoch = int(epoch)
        if self._auto_shard is not None:
            self._auto_shard.set_epoch(self._epoch if rest is None else self._epoch + 1)
            self._auto_epoch_set = self._auto_shard.epoch

    def __repr__(self) -> str:
        if self._iterable:
            return (f"pyloader.torch.DataLoader({type(self.dataset).__name__}, an IterableDataset over "
                    f"num_workers={self.num_workers}, mode={self.mode!r}, next epoch={self._epoch})")
        return (
            f"pyloader.torch.DataLoader({type(self.dataset).__name__}, batch_size={self.batch_size}, "
            f"num_workers={self.num_workers}, mode={self.mode!r}, batches={len(self)}, "
            f"next epoch={self._epoch}"
            + (", sharded by DistributedSampler" if self._auto_shard is not None else "")
            + ")"
        )


class _Plan:
    """An epoch's work: a list of index batches, or native array columns and a sample order."""

    def __init__(self, batches: list[Any] | None, native: tuple[list[np.ndarray], bool] | None,
                 skipped: int, order: np.ndarray | None = None) -> None:
        self.batches = batches
        self.native = native
        self.order = order
        self.skipped = skipped  # batches of the epoch consumed before this plan (a resumed state)


class _Pass:
    """What the two kinds of pass share: ``next()`` takes the Prefetcher's next batch and converts
    it to torch's (:meth:`_convert`), or turns a failed batch into what torch raises
    (:meth:`_recover`). After an error the pass stays usable, as torch's iterator: the next
    ``next()`` gives the next batch."""

    loader: DataLoader
    epoch: int
    yielded: int
    finished: bool
    _kind: Any
    _pin_device: str | None
    _timeout: float  # the DataLoader's, when the pass began (torch's iterator keeps its own too)
    _batches: Iterator[Any] | None

    def __iter__(self) -> _Pass:
        return self

    def __len__(self) -> int:
        return len(self.loader)  # torch's: len(dataset) when the dataset has one, else TypeError

    def __next__(self) -> Any:
        if self._batches is None:
            self._ended()
            raise StopIteration
        failed: BatchError | None = None
        try:
            batch = next(self._batches)
        except StopIteration:
            self._finish()
            raise
        except BatchError as err:
            failed = err
        except TimeoutError as exc:
            raise self._timed_out() from exc
        if failed is None:
            batch = self._convert(batch)
        else:  # outside the except clause: the user's exception keeps its context
            try:
                batch = self._recover(failed)
            except BaseException:
                self.yielded += 1  # like torch's iterator, the next next() gives the next batch
                raise
        if self._pin_device is not None:
            batch = _torch_pin_memory(batch, self._pin_device)
        self.yielded += 1
        return batch

    def _ended(self) -> None:
        """``next()`` after the pass's batches are gone: raise what torch raises, if not StopIteration."""
        self._finish()

    def _timed_out(self) -> BaseException:
        """torch's error for a batch that took longer than ``timeout``."""
        return RuntimeError(f"DataLoader timed out after {self._timeout} seconds")

    def _convert(self, batch: Any) -> Any:
        """The delivered batch as torch's collate would have made it."""
        if self._kind is _STACK:
            return _collated(batch)
        if self._kind is _CONVERT:
            return _converted(batch)
        return _unpack(batch)

    def _recover(self, err: BatchError) -> Any:
        """A failed batch: raises what torch raises, or returns the batch after all."""
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class _LoaderIter(_Pass):
    """One epoch of a :class:`DataLoader`: a Prefetcher over its plan, batches converted to torch's.

    After an error the iterator stays usable (as torch's does): the next ``next()`` continues with
    the following batch, on a new Prefetcher over the rest of the plan.

    With worker processes each Prefetcher has its own; :meth:`worker_pids`
    lists them. A newer pass of the same DataLoader retires this one: its processes end, and
    ``next()`` raises ``RuntimeError`` (unless the epoch was already over).
    """

    def __init__(self, loader: DataLoader, epoch: int, plan: _Plan) -> None:
        self.loader = loader
        self.epoch = epoch
        self.plan = plan
        self.yielded = plan.skipped
        self.finished = False
        self._replaced = False
        self._kind = loader._kind
        self._pin_device = loader._pin_device()
        self._timeout = loader.timeout
        self._workers = max(1, loader.num_workers)
        self._depth = max(1, (loader.prefetch_factor or 2) * self._workers)
        self._process = loader._processes()
        self._persistent = loader.persistent_workers  # torch's checks: only with num_workers > 0
        # Threads: worker_init_fn once per worker thread; not with num_workers=0, where torch loads
        # in the main process and calls no worker_init_fn.
        self._worker_init = (_WorkerInit(loader.worker_init_fn)
                             if loader.worker_init_fn is not None and not self._process and loader.num_workers > 0
                             else None)
        self._base_seed = getattr(loader, "_base_seed", 0)  # not drawn when a loaded state resumes
        self._seq: Any = None
        if plan.native is not None:
            columns, self._as_tuple = plan.native
            try:
                self._seq = _OrderedArrays(columns, loader.batch_size, loader.drop_last, plan.order)
                self._count = len(self._seq)
            except ValueError:  # rows that are not contiguous: fetch samples in Python instead
                self._count = len(loader.batch_sampler)
                plan.batches = self._index_batches()
                plan.native = None
        else:
            assert plan.batches is not None, "a plan holds index batches or native columns"
            self._count = len(plan.batches)
        self._base = 0  # plan position of the current Prefetcher's first batch
        self._prefetcher: Prefetcher | None = None
        self._batches: Iterator[Any] | None = None
        self._start(0)

    def _start(self, base: int) -> None:
        self._close_prefetcher()
        self._base = base
        if base >= self._count:
            return
        loader = self.loader
        options: dict[str, Any] = {}
        if self._seq is not None and base == 0:
            seq: Any = self._seq
            mode = "thread"  # a native gather runs no Python: nothing for a process to do
        else:
            batches = self._index_batches()[base:]
            kind = self._kind if self._seq is None else _STACK
            mode = "process" if self._process else "thread"
            if self._persistent:
                kept = loader._kept
                if kept is not None and kept[0] is kind and not kept[1]._closed:
                    # Persistent workers: the same threads or processes load this pass's plan.
                    self._prefetcher = kept[1]
                    self._prefetcher._renew("renew", batches)
                    self._batches = iter(self._prefetcher)
                    return
                loader._drop_kept()
            seq = _EpochBatches(loader.dataset, batches, kind, loader.collate_fn, self._worker_init)
        if mode == "process":
            options = dict(
                start_method=_start_method(self.loader),
                worker_init_fn=_ProcessWorkerInit(loader.worker_init_fn, self._workers, loader.dataset,
                                                  self._base_seed),
                seed=_worker_seed(self._base_seed, self.epoch, self.plan.skipped + base),
            )
        try:
            self._prefetcher = Prefetcher(
                seq,
                workers=self._workers,
                depth=self._depth,
                pin="cuda" if self._pin_device == "cuda" and torch.cuda.is_available() else False,
                timeout=self._timeout if self._timeout > 0 else None,
                mode=mode,
                **options,
            )
        except UnpicklableError as exc:
            clearer = _unpicklable(self.loader, options["start_method"]) if options else None
            if clearer is not None:
                raise clearer from exc
            raise
        self._prefetcher._plan_ahead = False  # the next pass's plan is drawn when it starts
        if self._persistent and isinstance(seq, _EpochBatches):
            loader._kept = (kind, self._prefetcher)
        self._batches = iter(self._prefetcher)

    def worker_pids(self) -> list[int]:
        """Worker processes: the process ids of this pass's current worker processes (a replaced
        worker's successor takes its place); ``[]`` with threads or once the pass is over."""
        p = self._prefetcher
        return [] if p is None else p.worker_pids()

    def _index_batches(self) -> list[Any]:
        if self.plan.batches is not None:
            return self.plan.batches
        bs = self.loader.batch_size
        assert self.plan.native is not None, "a plan holds index batches or native columns"
        n = len(self.plan.native[0][0])
        order = np.arange(n, dtype=np.int64) if self.plan.order is None else self.plan.order
        flat = order.tolist()
        self.plan.batches = [flat[k : k + bs] for k in range(0, self._count * bs, bs)]
        return self.plan.batches

    def remaining(self) -> list[Any]:
        """The index batches not yet yielded."""
        return self._index_batches()[self.yielded - self.plan.skipped :]

    def _ended(self) -> None:
        if self._replaced and not self.finished:
            raise RuntimeError(
                "this DataLoader iterator was replaced by a newer iter() of its DataLoader, which "
                "took its workers (with worker processes or persistent_workers=True a DataLoader runs "
                "one pass at a time)"
            )
        self._finish()

    def _timed_out(self) -> BaseException:
        self._start(self.yielded - self.plan.skipped)  # the late batch is loaded again
        return super()._timed_out()

    def _convert(self, batch: Any) -> Any:
        if self._seq is not None and self._base == 0:  # natively gathered columns
            if type(batch) is np.ndarray:
                t = torch.from_numpy(batch)
                return [t] if self._as_tuple else t
            return [torch.from_numpy(a) for a in batch]
        return super()._convert(batch)

    def _user_error(self, original: BaseException, what: str, worker: int) -> BaseException:
        """The user's exception, as torch re-raises it (its own type), with a note saying where it
        was raised: torch's part (which worker) and pyloader's (the batch, the epoch)."""
        if worker < 0:
            who = "the main process"
        elif self._process:
            who = f"DataLoader worker process {worker}"
        else:
            who = f"DataLoader worker thread {worker}"
        add_note(original, f"Caught {type(original).__name__} in {who}: raised by {what} while loading "
                           f"batch {self.yielded} of epoch {self.epoch} (pyloader.torch.DataLoader)")
        return original

    def _sample_error(self, failure: _SampleFailure, worker: int) -> BaseException:
        original = failure.__cause__
        assert original is not None, "a _SampleFailure is raised from the sample's exception"
        for note in getattr(failure, "__notes__", ()):  # process mode: the worker's traceback, as text
            if note not in getattr(original, "__notes__", ()):
                add_note(original, note)
        where = ("dataset.__getitems__(...)" if failure.sample_index is None
                 else f"dataset[{failure.sample_index!r}]")
        return self._user_error(original, f"{where} (dataset indices {reprlib.repr(failure.sample_indices)})",
                                worker)

    def _recover(self, err: BatchError) -> Any:
        """Handles a failed batch: raises what torch raises, or (a batch the native stack refused)
        collates it with torch's ``default_collate``. Iteration continues after it on the next
        ``next()``: the Prefetcher goes on by itself after a failed batch, so its workers (and
        worker processes) carry on, nothing is restarted.
        """
        at = self.yielded - self.plan.skipped  # the plan position that failed
        cause = err.__cause__
        if isinstance(err, WorkerDiedError):
            raise _worker_died(err, self.yielded, self.epoch)
        if isinstance(cause, _SampleFailure):
            raise self._sample_error(cause, err.worker)
        if cause is None:
            raise err
        if not (self._kind is _STACK and isinstance(cause, _C.StackError)):
            what = "collate_fn" if self._kind in (_COLLATE, _CUSTOM) else "the worker"
            raise self._user_error(cause, what, err.worker)
        # The native stack refused the samples: torch decides, in this thread, with its own
        # default_collate (the result, or the error, is then exactly torch's).
        indices = self._index_batches()[at]
        error: BaseException | None
        try:
            samples = _EpochBatches(self.loader.dataset, [], _STACK, None, None).fetch(indices)
        except _SampleFailure as failure:
            error = self._sample_error(failure, -1)
        else:
            try:
                batch = default_collate(samples)
            except Exception as exc:
                error = self._user_error(exc, f"torch's default_collate (dataset indices {reprlib.repr(indices)})",
                                         -1)
            else:
                error = None
        if error is not None:
            raise error
        if not self.loader._warned_fallback:
            self.loader._warned_fallback = True
            warnings.warn(
                f"batch {self.yielded} of epoch {self.epoch}: {cause}; torch's default_collate accepts "
                "these samples, so the batch was collated by torch in the consumer thread (slower). "
                "Make the samples uniform (same dict key order, same dtypes) to keep collation native.",
                StackFallbackWarning,
                stacklevel=3,
            )
        return batch

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._close_prefetcher()
            self._batches = None

    def _close_prefetcher(self) -> None:
        p, self._prefetcher, self._batches = self._prefetcher, None, None
        kept = self.loader._kept
        if p is not None and (kept is None or p is not kept[1]):  # persistent workers stay
            p.close()

    def _retire(self) -> None:
        """A newer pass of the DataLoader started: end this one's workers."""
        if not self.finished and self._prefetcher is not None:
            self._replaced = True
            self._close_prefetcher()

    def close(self) -> None:
        """Stops the epoch's workers, threads or processes (also done at the end of the epoch and on
        deletion)."""
        self._close_prefetcher()

    def __del__(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._close_prefetcher()


def _start_method(loader: DataLoader) -> str | None:
    """The start method of ``multiprocessing_context`` (torch turns a name into a context)."""
    ctx = loader.multiprocessing_context
    if ctx is None or isinstance(ctx, str):
        return ctx
    return ctx.get_start_method()


def _unpicklable(loader: DataLoader, start_method: str) -> TypeError | None:
    """Which DataLoader argument a spawned worker process cannot receive, in torch's terms."""
    from multiprocessing.reduction import ForkingPickler

    for name in ("dataset", "collate_fn", "worker_init_fn"):
        value = getattr(loader, name)
        try:
            ForkingPickler.dumps(value)
        except Exception as exc:
            return TypeError(
                f"multiprocessing_context={start_method!r} starts the worker processes from a fresh "
                f"interpreter, which receives the DataLoader's {name} pickled, and this {name} "
                f"({type(value).__name__}) cannot be pickled: {type(exc).__name__}: {exc}. Make it "
                "picklable (module-level classes and functions, no open handles or locks), or use "
                "multiprocessing_context='fork'"
            )
    return None


class _IterableIter(_Pass):
    """One pass over an IterableDataset: its Stream's batches, converted to torch's.

    After an error the iterator stays usable, as torch's: ``next()`` goes on with the next batch
    (the worker whose iterator raised has ended, as a torch worker whose generator raised).
    """

    def __init__(self, loader: DataLoader, epoch: int, stream: Stream) -> None:
        self.loader = loader
        self.epoch = epoch
        self.stream = stream
        self.yielded = 0
        self.finished = False
        self._kind = loader._kind
        self._process = stream.mode == "process"
        self._pin_device = loader._pin_device()
        self._timeout = loader.timeout
        # NOTE [ IterableDataset and __len__ ] in torch: a len() taken before this pass began makes
        # every batch past it warn.
        self._len_called: int | None = loader._IterableDataset_len_called
        self._batches: Iterator[Any] | None = iter(stream)

    def worker_pids(self) -> list[int]:
        """This pass's worker processes (``[]`` with a thread, or once the pass is over)."""
        return [] if self._batches is None else self.stream.loader.worker_pids()

    def __next__(self) -> Any:
        batch = super().__next__()
        if self._len_called is not None and self.yielded > self._len_called:
            # torch's warning, in torch's words (its tests match them).
            message = (f"Length of IterableDataset {self.loader.dataset} was reported to be {self._len_called}"
                       f"(when accessing len(dataloader)), but {self.yielded} samples have been fetched. ")
            if self.loader.num_workers > 0:
                message += ("For multiprocessing data-loading, this could be caused by not properly configuring "
                            "the IterableDataset replica at each worker. Please see "
                            "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples.")
            warnings.warn(message, stacklevel=2)
        return batch

    def _recover(self, err: BatchError) -> Any:
        """What torch raises: a dead worker's RuntimeError, or the user's exception with a note."""
        if isinstance(err, WorkerDiedError):
            raise _worker_died(err, self.yielded, self.epoch)
        cause = err.__cause__
        if cause is None:
            raise err
        who = f"DataLoader worker process {err.worker}" if self._process else "the main process"
        add_note(cause, f"Caught {type(cause).__name__} in {who}: raised while loading batch {self.yielded} "
                        f"of epoch {self.epoch} from the IterableDataset (pyloader.torch.DataLoader)")
        raise cause

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._batches = None
            if self.stream is not self.loader._kept_stream:
                self.stream.close()

    def _retire(self) -> None:
        """A newer pass of the DataLoader started: this one ends (its workers with it)."""
        self._finish()

    def close(self) -> None:
        """Stops the pass's workers (also done at its end and on deletion)."""
        self._finish()

    def __del__(self) -> None:
        if not getattr(self, "finished", True):
            self._finish()


def _worker_died(err: WorkerDiedError, batch: int, epoch: int) -> WorkerDiedError:
    """torch's error for a batch whose workers died: a RuntimeError naming the worker's pid and
    signal ("DataLoader worker (pid 123) is killed by signal: ..."); WorkerDiedError is one, and
    its text says both."""
    return WorkerDiedError(
        f"DataLoader worker process {err.worker} exited unexpectedly while loading batch {batch} "
        f"of epoch {epoch}, on every retry: {err}",
        index=batch, epoch=epoch, position=err.position, worker=err.worker,
    )
