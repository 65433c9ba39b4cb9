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

The package, one idea per module: :mod:`._loader` (the DataLoader and its iterator: torch's epochs
on a Prefetcher), :mod:`._batching` (what the workers run for one batch; the natively gathered
arrays), :mod:`._codec` (tensors to marked arrays and back; torch's batch from a delivered one),
:mod:`._device` (``prefetch``: batches copied to a device ahead); the walk over nested batches is
:mod:`pyloader._tree`'s.
"""

from __future__ import annotations

from ._device import DevicePrefetcher, prefetch
from ._loader import DataLoader, StackFallbackWarning

__all__ = ["DataLoader", "DevicePrefetcher", "StackFallbackWarning", "prefetch"]

# The public names keep the module users import them from (in reprs, tracebacks and pickles).
for _public in (DataLoader, DevicePrefetcher, StackFallbackWarning, prefetch):
    _public.__module__ = __name__
del _public
