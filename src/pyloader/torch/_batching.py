"""Sample batching: what the DataLoader's workers run for one batch, and the natively gathered arrays.

A pass's plan (its list of index batches) becomes an :class:`_EpochBatches`, the batch Sequence a
:class:`~pyloader.Prefetcher` loads on its workers: batch ``i`` fetches the samples of ``plan[i]``
(:func:`pyloader._batches.fetch_samples`, the fetch :func:`pyloader.batches` uses too:
``dataset.__getitems__`` or ``dataset[j]``, like torch's fetcher) and, for torch's
``default_collate``, returns :func:`pyloader.stack` of them, tensors packed as marked arrays
(:mod:`._codec`); a custom ``collate_fn`` (or ``batch_size=None``) runs in the worker as torch's
would. A sample that raises travels as a picklable :class:`_SampleFailure` that names it.
Worker set-up lives here too: ``worker_init_fn`` once per worker thread (:class:`_WorkerInit`),
torch's worker-loop state in a worker process (:class:`_ProcessWorkerInit`), and the seed of a
pass's worker processes (:func:`_worker_seed`).

In-memory arrays (``TensorDataset``, an array or a tensor as the dataset) need no Python per
batch: :func:`_array_columns` finds their numpy columns and :class:`_OrderedArrays` has the native
core gather their rows in the sampler's order.
"""

from __future__ import annotations

import pickle
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torch.utils.data._utils import worker as _torch_worker

from .._batches import fetch_samples
from .._errors import add_note
from ..arrays import ArraySequence
from ..collate import stack
from ._codec import _holds_tensor, _pack

# What a worker does with a batch's samples: stack them natively (torch's default_collate), call
# the user's collate_fn, or (batch_size=None) return dataset[i] as is or through collate_fn.
_STACK, _COLLATE, _CONVERT, _CUSTOM = "stack", "collate", "convert", "custom"
_KINDS = {kind: kind for kind in (_STACK, _COLLATE, _CONVERT, _CUSTOM)}


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
                    add_note(replica, note)
                cause = replica
        return _rebuild_failure, (self.sample_index, self.sample_indices, cause)


def _rebuild_failure(sample_index: Any, sample_indices: Any, cause: BaseException | None) -> _SampleFailure:
    failure = _SampleFailure(sample_index, sample_indices)
    failure.__cause__ = cause
    return failure


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
        def failed(j: Any, exc: BaseException) -> None:
            raise _SampleFailure(j, indices) from exc

        return fetch_samples(self.dataset, self.getitems, indices, failed)

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
            assert self.collate_fn is not None
            batch = self.collate_fn(self.fetch(self.plan[i]))
        elif kind is _CONVERT:
            batch = self.get(self.plan[i])
        else:  # _CUSTOM: collate_fn(dataset[i])
            assert self.collate_fn is not None
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

    Called by :mod:`pyloader.process` as ``worker_init(worker_id)`` in each new worker process
    (after pyloader's own seeding, which this replaces): one intra-op thread, torch's seeds
    (``random`` and torch from ``base_seed + worker_id``, numpy from torch's ``_generate_state``),
    ``get_worker_info()``, then ``worker_init_fn(worker_id)``: so ``torch.initial_seed()``, the
    random streams and the worker info are torch's own, and with batch ``i`` on worker
    ``i % num_workers`` (the engine's round-robin, ``Loader::round_robin``) so is every random draw.
    Picklable when ``fn`` and ``dataset`` are (pickled with the Sequence, so ``dataset`` stays the
    object the worker's Sequence loads from).
    """

    def __init__(self, fn: Callable[[int], Any] | None, num_workers: int, dataset: Any, base_seed: int) -> None:
        self.fn = fn
        self.num_workers = num_workers
        self.dataset = dataset  # the worker's copy is the one its batch Sequence holds
        self.base_seed = base_seed

    def __call__(self, worker_id: int) -> None:
        torch.set_num_threads(1)
        seed = self.base_seed + worker_id
        random.seed(seed)
        torch.manual_seed(seed)
        np.random.seed(_torch_worker._generate_state(self.base_seed, worker_id))
        _torch_worker._worker_info = _torch_worker.WorkerInfo(
            id=worker_id, num_workers=self.num_workers, seed=seed, dataset=self.dataset
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
        if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided
                or t.requires_grad or t.ndim < 1):
            return None
        try:
            columns.append(t.numpy())
        except (TypeError, RuntimeError):
            return None
    return columns, as_tuple

