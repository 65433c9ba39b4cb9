"""PyTorch adapter: a drop-in ``torch.utils.data.DataLoader`` whose batches pyloader loads ahead.

Switch by changing one import (``from pyloader.torch import DataLoader``): the class is a subclass of
torch's whose constructor is torch's own (the signature, the argument checks and their messages, the
attributes), ``len()`` is torch's, and so are the batches and their order.

How equality with torch is guaranteed, step by step:

1. *Order.* Torch draws an epoch's indices in the consumer, from the sampler, as the iterator
   asks for them. So do we, the same way: ``iter(index_sampler)``, then the workers' ``base_seed``
   from the ``generator`` (exactly as torch's iterator does, so the generator's stream stays
   aligned), then the whole epoch's index lists. They become the epoch's *plan*: a batch
   Sequence over the list of index lists, which a :class:`~pyloader.Prefetcher` (no shuffle, no
   shard: the sampler did both) loads ahead on its workers (threads or processes, see below), in
   order.
2. *Contents.* A worker fetches the samples (``dataset.__getitems__`` or ``dataset[i]``, like
   torch's fetcher) and returns :func:`pyloader.stack` of them: the engine collates them into slot
   memory with the GIL released (a worker process: into the shared slot memory), with
   ``default_collate``'s numpy semantics. Torch tensors in the samples travel as zero-copy
   ``.numpy()`` views whose dtype is marked (numpy dtype metadata), so the consumer restores dtypes
   numpy lacks (``bfloat16``). The consumer turns the delivered
   structure into torch's: arrays become ``torch.from_numpy`` views of the slot (no copy; the
   tensor keeps the lease alive), tuples become lists, and any leaf the native stack left as a list
   of values (mixed types, objects, tensors it could not view) goes through torch's own
   ``default_collate``. A batch the native stack refuses (dict keys in another order, dtypes to
   promote, ragged shapes) is recomputed in the consumer with torch's ``default_collate``, so the
   result, or the error, is torch's.
3. A custom ``collate_fn`` runs in the worker; its tensors travel the same way and come back as
   tensors, its numpy arrays stay arrays. With ``batch_size=None`` the consumer applies torch's
   ``default_convert`` rules to the batch the worker returned.
4. In-memory arrays (``TensorDataset``, a numpy array or a tensor as the dataset) with the default
   samplers are gathered by the native core with no Python and no GIL per batch, in the order the
   sampler drew.

Workers come in two kinds, chosen with ``mode``:

- ``mode="thread"`` (the default): workers are threads of this process. Nothing is pickled or
  forked, but with ``num_workers > 1`` the dataset is called from several threads at once, so its
  ``__getitem__`` must be safe to call concurrently (reads of arrays, files at offsets, decoding
  are). ``num_workers=0`` (torch: load in the main process) uses one worker *thread*: it is in the
  main process, so nothing is pickled or forked, the dataset is never called concurrently, and
  loading still overlaps the training step. ``worker_init_fn`` runs once in each worker thread
  before its first batch. Randomness inside ``__getitem__`` is not seeded per worker (threads
  share torch's, numpy's and Python's global generators), ``torch.utils.data.get_worker_info()``
  is ``None`` in the worker threads, and ``multiprocessing_context`` is checked but unused.
- ``mode="process"``: for a ``__getitem__`` that holds the GIL (Python-level decoding and
  augmentation). ``num_workers`` worker *processes* (``num_workers=0``: one worker process, so
  that the dataset sees the same environment whatever the count) fetch and collate the samples
  and write the batch's arrays straight into shared memory; the tensors you receive are views of
  it, as in thread mode. Each worker process is forked from a single-threaded zygote process
  (:mod:`pyloader.process`); ``multiprocessing_context`` (``"fork"``, ``"spawn"``,
  ``"forkserver"`` or a context object) picks how the zygote starts: with spawn or forkserver it
  receives the dataset, ``collate_fn`` and ``worker_init_fn`` pickled, so they must be picklable
  (module-level classes and functions). In each worker, as in torch's worker loop, torch uses one
  intra-op thread, ``get_worker_info()`` gives the worker's ``id``, ``num_workers``, ``seed`` and
  its copy of the ``dataset``, and then ``worker_init_fn(worker_id)`` is called. Python's
  ``random``, numpy's and torch's global generators are seeded per worker from the ``base_seed``
  drawn from ``generator`` (as torch draws it), the epoch and the worker id: reproducible, though
  not torch's own values. A worker that dies (a crash, the out-of-memory killer) is replaced by a
  new one (``worker_init_fn`` runs again with the same id) and its batch is loaded again, so the
  epoch still yields every batch, in order. Each pass starts its own worker processes and ends
  them when it finishes, breaks, or is deleted, as torch's non-persistent workers do; a new pass
  also ends a previous unfinished pass of the same DataLoader, whose iterator then raises
  ``RuntimeError``. In-memory arrays (step 4) need no Python per batch, so they are gathered by
  native threads in either mode.

``persistent_workers=True`` (with ``num_workers > 0``), in either mode: the workers live as long
as the DataLoader, as torch's do. Each pass sends them its index batches (a few bytes per batch,
pickled once per pass), and they keep what they hold between passes: the worker processes'
copies of the dataset (opened files, caches), their random generators, ``worker_init_fn`` having
run once. No fork or thread start per epoch. A worker process that dies is replaced by one forked
from the zygote, which then receives the current pass's batches before its first one. A new pass
takes the workers over from an unfinished one, whose iterator then raises ``RuntimeError``.

Distributed: when ``torch.distributed`` is initialized and no ``sampler``/``batch_sampler`` is
given, the default sampler becomes ``DistributedSampler(dataset, shuffle=shuffle, seed=...,
drop_last=drop_last)`` whose epoch advances with every pass (``set_epoch`` is called for you).
Pass any sampler explicitly to opt out.
"""

from __future__ import annotations

import collections
import itertools
import pickle
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
    TensorDataset,
)
from torch.utils.data._utils import worker as _torch_worker
from torch.utils.data._utils.collate import (
    default_collate,
    default_collate_err_msg_format,
    default_convert,
    np_str_obj_array_pattern,
)
from torch.utils.data._utils.pin_memory import pin_memory as _torch_pin_memory

from ._errors import BatchError
from .arrays import ArraySequence
from .collate import stack
from .prefetcher import _MODES, Prefetcher

__all__ = ["DataLoader", "DevicePrefetcher", "SampleError", "StackFallbackWarning", "prefetch"]

_STATE_VERSION = 1
_KEY = "pyloader.torch"  # numpy dtype metadata: the array is a torch tensor's view (value: dtype name)


class SampleError(BatchError):
    """``dataset[i]`` (or ``dataset.__getitems__``) raised while a worker loaded a batch.

    ``__cause__`` is the original exception, with its traceback.

    Attributes:
        index: the batch's number in its epoch.
        sample_index: the dataset index that raised (``None`` when ``__getitems__`` raised).
        sample_indices: the dataset indices of the batch.
        epoch: the loader's epoch.
        position: the engine position; worker: the worker thread that ran it.
    """

    def __init__(self, message: str, *, index: int, epoch: int, position: int, worker: int,
                 sample_index: Any, sample_indices: Any) -> None:
        super().__init__(message, index=index, epoch=epoch, position=position, worker=worker)
        self.sample_index = sample_index
        self.sample_indices = sample_indices


class StackFallbackWarning(UserWarning):
    """The native collation refused a batch that torch's ``default_collate`` accepts; the batch was
    collated by torch in the consumer thread (correct, but slower)."""


class _SampleFailure(Exception):
    """Raised in a worker: which sample failed (the original exception is ``__cause__``)."""

    def __init__(self, sample_index: Any, sample_indices: Any) -> None:
        super().__init__(sample_index)
        self.sample_index = sample_index
        self.sample_indices = sample_indices

    def __reduce__(self) -> tuple[Any, ...]:
        # Process mode: the failure travels pickled from the worker process, with its cause (which
        # plain exception pickling drops), or a RuntimeError replica of a cause that cannot travel.
        cause = self.__cause__
        if cause is not None:
            try:
                pickle.loads(pickle.dumps(cause))
            except Exception:
                replica = RuntimeError(f"{type(cause).__qualname__}: {cause}")
                for note in getattr(cause, "__notes__", ()):
                    replica.add_note(note)
                cause = replica
        return _rebuild_failure, (self.sample_index, self.sample_indices, cause)


def _rebuild_failure(sample_index: Any, sample_indices: Any, cause: BaseException | None) -> _SampleFailure:
    failure = _SampleFailure(sample_index, sample_indices)
    failure.__cause__ = cause
    return failure


# ---- tensors <-> slot arrays -------------------------------------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_marked: dict[tuple[np.dtype, str], np.dtype] = {}


def _marked_dtype(dtype: np.dtype, name: str) -> np.dtype:
    key = (dtype, name)
    marked = _marked.get(key)
    if marked is None:
        marked = _marked[key] = np.dtype(dtype, metadata={_KEY: name})
    return marked


def _tensor_view(t: torch.Tensor) -> Any:
    """A numpy view of a CPU tensor, its dtype marked as a tensor's; ``t`` itself if none exists."""
    if t.device.type != "cpu" or t.layout != torch.strided or t.requires_grad:
        return t
    try:
        a = t.numpy()
        name = ""
    except TypeError:  # a dtype numpy lacks (bfloat16, float8...): carry the bits
        itype = _INT_OF_SIZE.get(t.element_size())
        if itype is None:
            return t
        try:
            a = t.view(itype).numpy()
        except (TypeError, RuntimeError):
            return t
        name = str(t.dtype).rpartition(".")[2]
    except RuntimeError:  # conjugate or negative bit set
        return t
    return a.view(_marked_dtype(a.dtype, name))


def _restore(a: np.ndarray) -> torch.Tensor:
    """The tensor of a marked array (a zero-copy view of the same memory)."""
    t = torch.from_numpy(a)
    name = a.dtype.metadata[_KEY]
    return t.view(getattr(torch, name)) if name else t


def _is_marked(a: np.ndarray) -> bool:
    md = a.dtype.metadata
    return md is not None and _KEY in md


def _holds_tensor(obj: Any) -> bool:
    """Whether a tensor sits anywhere the engine looks (exact tuple/list/dict, namedtuple)."""
    tp = type(obj)
    if tp is torch.Tensor:
        return True
    if tp is tuple or tp is list or (isinstance(obj, tuple) and hasattr(tp, "_fields")):
        return any(_holds_tensor(x) for x in obj)
    if tp is dict:
        return any(_holds_tensor(x) for x in obj.values())
    return False


def _pack(obj: Any) -> Any:
    """Replaces tensors with marked numpy views, where the engine looks (it copies those)."""
    tp = type(obj)
    if tp is torch.Tensor:
        return _tensor_view(obj)
    if tp is tuple:
        return tuple([_pack(x) for x in obj])
    if tp is list:
        return [_pack(x) for x in obj]
    if tp is dict:
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return tp(*[_pack(x) for x in obj])
    return obj


def _unpack(obj: Any) -> Any:
    """Inverse of :func:`_pack` on a delivered batch: marked arrays become tensors again."""
    tp = type(obj)
    if tp is np.ndarray:
        return _restore(obj) if _is_marked(obj) else obj
    if tp is tuple:
        return tuple([_unpack(x) for x in obj])
    if tp is list:
        return [_unpack(x) for x in obj]
    if tp is dict:
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return tp(*[_unpack(x) for x in obj])
    return obj


def _collated_array(a: np.ndarray) -> torch.Tensor:
    if _is_marked(a):
        return _restore(a)
    if np_str_obj_array_pattern.search(a.dtype.str) is not None:
        raise TypeError(default_collate_err_msg_format.format(a.dtype))
    return torch.from_numpy(a)


def _is_field(x: Any) -> bool:
    """Whether ``x`` can be a field the native stack built (else it is a sample's raw value)."""
    tp = type(x)
    return (tp is np.ndarray or tp is list or tp is tuple or tp is dict
            or (isinstance(x, tuple) and hasattr(tp, "_fields")))


def _collated(obj: Any, in_sequence: bool = False) -> Any:
    """Torch's ``default_collate`` result from what the native stack delivered.

    The stack keeps the samples' structure (exact tuple, list, dict, namedtuple), stacks arrays,
    and turns a leaf it cannot stack into the list of the samples' values: torch's own
    ``default_collate`` collates that, so the result is torch's whatever the leaf holds. Torch
    transposes sequences with ``zip``, so a leaf under a tuple, list or namedtuple reaches its
    collate function as a tuple of values (and strings stay that tuple), under a dict as a list.
    """
    tp = type(obj)
    if tp is np.ndarray:
        return _collated_array(obj)
    if tp is tuple:
        return [_collated(x, True) for x in obj]  # torch: a tuple of fields collates into a list
    if tp is dict:
        return {k: _collated(v) for k, v in obj.items()}
    if tp is list:
        if all(_is_field(x) for x in obj):
            return [_collated(x, True) for x in obj]
        return default_collate(tuple(obj) if in_sequence else obj)  # the samples' values of a leaf
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return tp(*[_collated(x, True) for x in obj])
    return obj


def _converted(obj: Any) -> Any:
    """Torch's ``default_convert`` of a delivered batch (fast paths for the exact types)."""
    tp = type(obj)
    if tp is np.ndarray:
        if _is_marked(obj):
            return _restore(obj)
        if np_str_obj_array_pattern.search(obj.dtype.str) is not None:
            return obj
        return torch.from_numpy(obj)
    if tp is tuple or tp is list:
        return [_converted(x) for x in obj]
    if tp is dict:
        return {k: _converted(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return tp(*[_converted(x) for x in obj])
    if tp is int or tp is float or tp is str or tp is bytes or tp is bool or obj is None:
        return obj
    return default_convert(obj)


def _as_tensors(obj: Any) -> Any:
    """Every array of a delivered batch as a tensor view, the structure unchanged (for prefetch)."""
    tp = type(obj)
    if tp is np.ndarray:
        if _is_marked(obj):
            return _restore(obj)
        if obj.dtype.hasobject or np_str_obj_array_pattern.search(obj.dtype.str) is not None:
            return obj
        return torch.from_numpy(obj)
    if tp is tuple:
        return tuple([_as_tensors(x) for x in obj])
    if tp is list:
        return [_as_tensors(x) for x in obj]
    if tp is dict:
        return {k: _as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return tp(*[_as_tensors(x) for x in obj])
    return obj


# ---- what the workers run ---------------------------------------------------------------------

_STACK, _COLLATE, _CONVERT, _CUSTOM = "stack", "collate", "convert", "custom"
_KINDS = {kind: kind for kind in (_STACK, _COLLATE, _CONVERT, _CUSTOM)}


class _EpochBatches:
    """Batch ``i`` of one pass: the samples of ``plan[i]``, fetched and collated on a worker.

    Its Prefetcher does not plan ahead, so only this pass's positions load; with persistent
    workers, :meth:`renew` gives it the next pass's plan (in every worker process too).
    """

    def __init__(self, dataset: Any, plan: list[Any], kind: str, collate_fn: Callable[[Any], Any] | None,
                 worker_init: _WorkerInit | None) -> None:
        self.dataset = dataset
        self.plan = plan
        self.kind = kind
        self.collate_fn = collate_fn
        self.worker_init = worker_init
        getitems = getattr(dataset, "__getitems__", None)
        self.getitems = getitems if kind in (_STACK, _COLLATE) and getitems else None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a spawned worker process: ``kind`` is compared by identity, so it must be
        # this module's constant again, not an equal string.
        self.__dict__.update(state)
        self.kind = _KINDS[self.kind]

    def renew(self, plan: list[Any]) -> None:
        """The next pass's index batches (persistent workers keep this object)."""
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def fetch(self, indices: Any) -> list[Any]:
        if self.getitems is not None:
            try:
                return self.getitems(indices)
            except Exception as exc:
                raise _SampleFailure(None, indices) from exc
        dataset = self.dataset
        samples = []
        j = None
        try:
            for j in indices:
                samples.append(dataset[j])
        except Exception as exc:
            raise _SampleFailure(j, indices) from exc
        return samples

    def get(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:
            raise _SampleFailure(index, [index]) from exc

    def __getitem__(self, i: int) -> Any:
        if self.worker_init is not None:
            self.worker_init()
        kind = self.kind
        if kind is _STACK:
            samples = self.fetch(self.plan[i])
            if samples and _holds_tensor(samples[0]):
                samples = [_pack(s) for s in samples]
            return stack(samples)
        if kind is _COLLATE:
            batch = self.collate_fn(self.fetch(self.plan[i]))
        elif kind is _CONVERT:
            batch = self.get(self.plan[i])
        else:  # _CUSTOM: collate_fn(dataset[i])
            batch = self.collate_fn(self.get(self.plan[i]))
        return _pack(batch) if _holds_tensor(batch) else batch


class _WorkerInit:
    """Calls ``worker_init_fn(worker_id)`` once in each worker thread, before its first batch."""

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn
        self.local = threading.local()
        self.lock = threading.Lock()
        self.next_id = 0

    def __call__(self) -> None:
        if getattr(self.local, "ready", False):
            return
        self.local.ready = True
        with self.lock:
            worker_id = self.next_id
            self.next_id += 1
        self.fn(worker_id)


class _ProcessWorkerInit:
    """Process mode: what torch's worker loop does in a new worker process, then ``worker_init_fn``.

    Called by :mod:`pyloader.process` as ``worker_init(worker_id)`` in each new worker process,
    after it seeded ``random``, numpy and torch. Picklable when ``fn`` and ``dataset`` are.
    """

    def __init__(self, fn: Callable[[int], Any] | None, num_workers: int, dataset: Any) -> None:
        self.fn = fn
        self.num_workers = num_workers
        self.dataset = dataset  # the worker's copy is the one its batch Sequence holds

    def __call__(self, worker_id: int) -> None:
        torch.set_num_threads(1)
        _torch_worker._worker_info = _torch_worker.WorkerInfo(
            id=worker_id, num_workers=self.num_workers, seed=torch.initial_seed(), dataset=self.dataset
        )
        if self.fn is not None:
            self.fn(worker_id)


def _worker_seed(base_seed: int, epoch: int, start: int) -> int:
    """The seed of one Prefetcher's worker processes: new for every pass (and restart) of a loader."""
    return int(np.random.SeedSequence([base_seed, epoch, start]).generate_state(1, np.uint64)[0] >> 1)


class _OrderedArrays(ArraySequence):
    """Rows of in-memory arrays in batches of the sampler's order, gathered by the native core."""

    def __init__(self, arrays: list[np.ndarray], batch_size: int, drop_last: bool, order: np.ndarray | None) -> None:
        super().__init__(*arrays, batch_size=batch_size, shuffle=False, seed=0, drop_last=drop_last)
        if order is not None and (len(order) != self.samples or (len(order) and not (
                0 <= int(order.min()) and int(order.max()) < self.samples))):
            # The native gather trusts its order (it would read outside the arrays).
            raise ValueError(f"the sampler's order does not fit the {self.samples} rows (one in-range index per row)")
        self.order = order

    def sample_order(self, epoch: int) -> np.ndarray | None:
        return self.order


# ---- the DataLoader ----------------------------------------------------------------------------


def _distributed() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            return dist.get_rank(), world
    return None


def _array_columns(dataset: Any) -> tuple[list[np.ndarray], bool] | None:
    """The numpy columns of an in-memory array dataset, and whether samples are tuples."""
    if type(dataset) is TensorDataset:
        tensors, as_tuple = list(dataset.tensors), True
    elif type(dataset) is torch.Tensor:
        tensors, as_tuple = [dataset], False
    elif type(dataset) is np.ndarray:
        if dataset.ndim < 1 or dataset.dtype.kind not in "biufc":
            return None
        return [dataset], False
    else:
        return None
    columns = []
    for t in tensors:
        if type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided or t.requires_grad or t.ndim < 1:
            return None
        try:
            columns.append(t.numpy())
        except (TypeError, RuntimeError):
            return None
    return columns, as_tuple


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader``, loaded ahead by pyloader's native threads or worker processes.

    A subclass of torch's DataLoader whose constructor *is* torch's: every argument has torch's
    meaning, default and checks (raised by torch's own code, so the messages are torch's), and the
    attributes (``sampler``, ``batch_sampler``, ``collate_fn``...) are the ones torch sets. What
    differs is where processes and threads differ:

    Args:
        dataset: a map-style dataset (``__getitem__`` and, for the default samplers, ``__len__``).
            An ``IterableDataset`` has no random access to load ahead by index: torch's own
            iterator loads it (with a warning).
        batch_size: samples per batch; ``None`` disables auto-batching (a dataset of batches).
        shuffle: reshuffle every epoch (a ``RandomSampler`` drawing from ``generator``).
        sampler: the order of the sample indices (opts out of automatic distributed sharding).
        batch_sampler: the batches of indices (excludes ``batch_size``, ``shuffle``, ``sampler``,
            ``drop_last``).
        num_workers: pyloader workers (threads, or processes with ``mode="process"``); ``0`` means
            one worker thread, or one worker process with ``mode="process"`` (see the module docs).
        collate_fn: turns a list of samples into a batch; runs in the worker. ``None``: torch's
            ``default_collate`` (done natively), or ``default_convert`` when ``batch_size=None``.
        pin_memory: pin the slot buffers (``cudaHostRegister``) when an accelerator is present.
        drop_last: drop the last partial batch.
        timeout: seconds to wait for one batch (``0``: forever).
        worker_init_fn: called as ``worker_init_fn(worker_id)`` once in each worker thread, or in
            each new worker process with ``mode="process"`` (a replaced worker's successor too).
        multiprocessing_context: checked as torch does; with ``mode="process"``, how the worker
            processes start (``"fork"``, ``"spawn"``, ``"forkserver"``, or a context object whose
            ``get_start_method()`` says it; ``None``: fork where it exists). Unused by threads.
        generator: draws the shuffle (and the ``base_seed`` torch draws for its workers).
        prefetch_factor: batches loaded ahead per worker (default 2).
        persistent_workers: keep the workers (threads or processes) from pass to pass, as torch
            does (see the module docs); the ``base_seed`` is drawn once, as torch does.
        pin_memory_device: deprecated in torch (warns as torch does).
        in_order: accepted; pyloader always delivers in order.
        mode: pyloader's worker kind: ``"thread"`` or ``"process"`` (see the module docs).

    Raises:
        ValueError, TypeError: the argument combinations torch rejects, with torch's messages;
            ``ValueError`` for a ``mode`` that is not ``"thread"`` or ``"process"``.
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
        mode: str = "thread",
    ) -> None:
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn,
            pin_memory, drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device, in_order=in_order,
        )
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self._auto_shard: DistributedSampler | None = None
        self._iterable = isinstance(self.dataset, IterableDataset)
        if self._iterable:
            warnings.warn(
                "pyloader.torch.DataLoader: an IterableDataset has no random access to load ahead "
                "by index; torch's own iterator loads it",
                stacklevel=2,
            )
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

        if self._auto_collation:
            self._kind = _STACK if self.collate_fn is default_collate else _COLLATE
        else:
            self._kind = _CONVERT if self.collate_fn is default_convert else _CUSTOM
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

    # -- epochs ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """One epoch of batches, torch's, in torch's order."""
        if self._iterable:
            return super().__iter__()
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
        if previous is not None and (self.mode == "process" or self._kept is not None):
            previous._retire()  # its worker processes end (or its persistent workers move on)
        it = _LoaderIter(self, epoch, plan)
        self._current = weakref.ref(it)
        return it

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
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
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
            raise TypeError("state_dict() needs a map-style dataset (this DataLoader delegates to torch's)")
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
            raise TypeError("load_state_dict() needs a map-style dataset (this DataLoader delegates to torch's)")
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
            return f"pyloader.torch.DataLoader({type(self.dataset).__name__}, loaded by torch's iterator)"
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


class _LoaderIter:
    """One epoch of a :class:`DataLoader`: a Prefetcher over its plan, batches converted to torch's.

    After an error the iterator stays usable (as torch's does): the next ``next()`` continues with
    the following batch, on a new Prefetcher over the rest of the plan.

    With ``mode="process"`` each Prefetcher has its own worker processes; :meth:`worker_pids`
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
        self._process = loader.mode == "process"
        self._persistent = loader.persistent_workers  # torch's checks: only with num_workers > 0
        self._worker_init = (_WorkerInit(loader.worker_init_fn)
                             if loader.worker_init_fn is not None and not self._process else None)
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
            mode = loader.mode
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
                start_method=self._start_method(),
                worker_init_fn=_ProcessWorkerInit(loader.worker_init_fn, self._workers, loader.dataset),
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
        except TypeError as exc:
            clearer = self._unpicklable(options["start_method"]) if options and str(exc).startswith(
                "start_method=") else None
            if clearer is not None:
                raise clearer from exc
            raise
        self._prefetcher._plan_ahead = False  # the next pass's plan is drawn when it starts
        if self._persistent and isinstance(seq, _EpochBatches):
            loader._kept = (kind, self._prefetcher)
        self._batches = iter(self._prefetcher)

    def _start_method(self) -> str | None:
        """The start method of ``multiprocessing_context`` (torch turns a name into a context)."""
        ctx = self.loader.multiprocessing_context
        if ctx is None or isinstance(ctx, str):
            return ctx
        return ctx.get_start_method()

    def _unpicklable(self, start_method: str) -> TypeError | None:
        """Which DataLoader argument a spawned worker process cannot receive, in torch's terms."""
        from multiprocessing.reduction import ForkingPickler

        loader = self.loader
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

    def worker_pids(self) -> list[int]:
        """``mode="process"``: the process ids of this pass's current worker processes (a replaced
        worker's successor takes its place); ``[]`` with threads or once the pass is over."""
        p = self._prefetcher
        return [] if p is None else p.worker_pids()

    def _index_batches(self) -> list[Any]:
        if self.plan.batches is not None:
            return self.plan.batches
        bs = self.loader.batch_size
        n = len(self.plan.native[0][0])
        order = np.arange(n, dtype=np.int64) if self.plan.order is None else self.plan.order
        flat = order.tolist()
        self.plan.batches = [flat[k : k + bs] for k in range(0, self._count * bs, bs)]
        return self.plan.batches

    def remaining(self) -> list[Any]:
        """The index batches not yet yielded."""
        return self._index_batches()[self.yielded - self.plan.skipped :]

    def __iter__(self) -> _LoaderIter:
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        if self._batches is None:
            if self._replaced and not self.finished:
                raise RuntimeError(
                    "this DataLoader iterator was replaced by a newer iter() of its DataLoader, which "
                    "took its workers (with mode='process' or persistent_workers=True a DataLoader runs "
                    "one pass at a time)"
                )
            self._finish()
            raise StopIteration
        try:
            batch = next(self._batches)
        except StopIteration:
            self._finish()
            raise
        except BatchError as err:
            batch = self._recover(err)
        except TimeoutError as exc:
            self._start(self.yielded - self.plan.skipped)  # the late batch is loaded again
            raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds") from exc
        else:
            batch = self._convert(batch)
        if self._pin_device is not None:
            batch = _torch_pin_memory(batch, self._pin_device)
        self.yielded += 1
        return batch

    def _convert(self, batch: Any) -> Any:
        kind = self._kind
        if self._seq is not None and self._base == 0:  # natively gathered columns
            if type(batch) is np.ndarray:
                t = torch.from_numpy(batch)
                return [t] if self._as_tuple else t
            return [torch.from_numpy(a) for a in batch]
        if kind is _STACK:
            return _collated(batch)
        if kind is _CONVERT:
            return _converted(batch)
        return _unpack(batch)

    def _sample_error(self, failure: _SampleFailure, position: int, worker: int) -> SampleError:
        original = failure.__cause__
        where = ("dataset.__getitems__(...)" if failure.sample_index is None
                 else f"dataset[{failure.sample_index!r}]")
        error = SampleError(
            f"{where} raised {type(original).__name__}: {original} (batch {self.yielded} of epoch "
            f"{self.epoch}, worker {worker}); the original traceback is above",
            index=self.yielded, epoch=self.epoch, position=position, worker=worker,
            sample_index=failure.sample_index, sample_indices=failure.sample_indices,
        )
        error.__cause__ = original
        for note in getattr(failure, "__notes__", ()):  # process mode: the worker's traceback, as text
            if note not in getattr(original, "__notes__", ()):
                original.add_note(note)
        return error

    def _recover(self, err: BatchError) -> Any:
        """Handles a failed batch; iteration continues after it on the next ``next()``.

        The Prefetcher goes on by itself after a failed batch, so its workers (and worker
        processes) carry on: nothing is restarted.
        """
        at = self.yielded - self.plan.skipped  # the plan position that failed
        cause = err.__cause__
        if isinstance(cause, _SampleFailure):
            raise self._sample_error(cause, err.position, err.worker)
        if not (self._kind is _STACK and isinstance(cause, ValueError)
                and str(cause).startswith("pyloader.stack:")):
            raise err
        # The native stack refused the samples: torch decides, in this thread, with its own
        # default_collate (the result, or the error, is then exactly torch's).
        indices = self._index_batches()[at]
        try:
            samples = _EpochBatches(self.loader.dataset, [], _STACK, None, None).fetch(indices)
        except _SampleFailure as failure:
            raise self._sample_error(failure, err.position, -1) from None
        try:
            batch = default_collate(samples)
        except Exception as exc:
            raise BatchError(
                f"default_collate raised {type(exc).__name__} on batch {self.yielded} of epoch "
                f"{self.epoch} (dataset indices {indices!r}): {exc}",
                index=self.yielded, epoch=self.epoch, position=err.position, worker=err.worker,
            ) from exc
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


# ---- prefetch: a Sequence to tensors, on a device ---------------------------------------------


def _tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    tp = type(obj)
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if tp is tuple:
        return tuple([_tree_map(fn, x) for x in obj])
    if tp is list:
        return [_tree_map(fn, x) for x in obj]
    if tp is dict:
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return tp(*[_tree_map(fn, x) for x in obj])
    return obj


class DevicePrefetcher:
    """Batches of a Sequence as torch tensors, copied to a device ahead of the consumer.

    On the CPU (``device`` None or ``"cpu"``) the batches are ``torch.from_numpy`` views of the slot
    buffers: no copy. With a CUDA device, each batch is copied from pinned slots with
    ``non_blocking=True`` on a side stream, ``ahead`` batches before it is needed; the consumer's
    current stream waits on the copy's event before the batch is handed over, the device tensors
    are recorded on the consumer's stream (so the caching allocator does not reuse them early), and
    the host batch is kept until its copy has finished.

    Args:
        sequence: a batch Sequence (``__len__``, ``__getitem__``).
        device: where the batches go.
        ahead: batches copied ahead of the consumer (CUDA only).
        **options: :class:`~pyloader.Prefetcher` options (``workers``, ``shuffle``, ``seed``...).
    """

    def __init__(self, sequence: Any, device: str | torch.device | None = None, *, ahead: int = 2,
                 **options: Any) -> None:
        self.device = None if device is None else torch.device(device)
        self._cuda = self.device is not None and self.device.type == "cuda"
        if self.device is not None and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device!r}")
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1:
            raise ValueError(f"ahead must be an integer >= 1, got {ahead!r}")
        if self._cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device!r} was requested but CUDA is not available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            options.setdefault("pin", "cuda")
        self.ahead = ahead
        self.prefetcher = Prefetcher(sequence, **options)
        self._stream: Any = None

    def __len__(self) -> int:
        return len(self.prefetcher)

    def __iter__(self) -> Iterator[Any]:
        """One epoch of batches (see :class:`~pyloader.Prefetcher` for epochs and resumption)."""
        host = (_as_tensors(b) for b in self.prefetcher)
        if not self._cuda:
            return host
        return self._to_device(host)

    def _to_device(self, host: Iterator[Any]) -> Iterator[Any]:
        device = self.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        side = self._stream
        queue: collections.deque[tuple[Any, Any, Any]] = collections.deque()
        copying: collections.deque[tuple[Any, Any]] = collections.deque()  # host batches in flight

        def launch() -> bool:
            try:
                batch = next(host)
            except StopIteration:
                return False
            with torch.cuda.stream(side):
                on_device = _tree_map(lambda t: t.to(device, non_blocking=True), batch)
                done = torch.cuda.Event()
                done.record(side)
            queue.append((on_device, done, batch))
            return True

        more = True
        try:
            while more and len(queue) < self.ahead:
                more = launch()
            while queue:
                on_device, done, batch = queue.popleft()
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(done)
                _tree_map(lambda t: t.record_stream(consumer), on_device)
                copying.append((done, batch))
                while copying and copying[0][0].query():
                    copying.popleft()
                if more:
                    more = launch()
                yield on_device
        finally:
            for done, _ in itertools.chain(copying, ((d, b) for _, d, b in queue)):
                done.synchronize()  # the slots stay alive until their copies are done

    def state_dict(self) -> dict[str, Any]:
        """The Prefetcher's :meth:`~pyloader.Prefetcher.state_dict`."""
        return self.prefetcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The Prefetcher's :meth:`~pyloader.Prefetcher.load_state_dict`."""
        self.prefetcher.load_state_dict(state)

    def close(self) -> None:
        """Stops the Prefetcher's workers."""
        self.prefetcher.close()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DevicePrefetcher({self.prefetcher!r}, device={self.device}, ahead={self.ahead})"


def prefetch(seq: Any, device: str | torch.device | None = None, **options: Any) -> DevicePrefetcher:
    """A Sequence of batches to an iterable of torch tensors, loaded (and copied) ahead.

    Example::

        with pyloader.torch.prefetch(seq, "cuda", workers=4) as batches:
            for epoch in range(epochs):
                for x, y in batches:
                    ...

    Args:
        seq: the batch Sequence.
        device: ``None`` or ``"cpu"`` (tensors are views of the slots), or a CUDA device.
        **options: ``ahead`` (batches copied ahead on CUDA) and :class:`~pyloader.Prefetcher`
            options.

    Returns:
        a :class:`DevicePrefetcher`; each ``iter()`` is one epoch.
    """
    return DevicePrefetcher(seq, device, **options)
