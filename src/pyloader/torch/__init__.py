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

Workers are processes or threads, chosen with ``mode``:

- ``mode="auto"`` (the default): what torch does. With ``num_workers > 0`` the dataset is loaded
  by worker *processes* (as below), because only processes keep torch's worker semantics: each
  worker has its own copy of the dataset, its own ``get_worker_info()`` and seeds, and a crash in
  native code inside ``dataset[i]`` is reported instead of ending the training process. With
  ``num_workers=0`` (torch: load in the main process) one worker *thread* of this process loads
  ahead: the dataset is the main process's object, ``get_worker_info()`` is ``None``, no
  ``worker_init_fn`` runs, as in torch. One difference remains there: the dataset's draws from the
  global random generators happen on the loading thread, ahead of the loop, so when the training
  loop draws from the same generators between batches the two interleave differently than in
  torch (which draws at each ``next()``). In-memory arrays (step 4) run no Python per batch and are
  gathered by native threads whatever the mode.
- ``mode="process"``: worker processes always. ``num_workers`` worker *processes*
  (``num_workers=0``: one worker process, where torch would load in the main process) fetch and
  collate the samples and write the batch's arrays straight into shared memory; the tensors you
  receive are views of it. Each worker process is forked from a single-threaded zygote process
  (:mod:`pyloader.process`); ``multiprocessing_context`` (``"fork"``, ``"spawn"``,
  ``"forkserver"`` or a context object) picks how the zygote starts: with spawn or forkserver it
  receives the dataset, ``collate_fn`` and ``worker_init_fn`` pickled (together, so a
  ``worker_init_fn`` that is a method of the dataset sets state on the worker's copy), so they must
  be picklable. In each worker, as in torch's worker loop: torch uses one intra-op thread;
  ``random`` and torch are seeded with ``base_seed + worker_id`` and numpy with torch's
  ``_generate_state(base_seed, worker_id)``, from the ``base_seed`` drawn from ``generator`` as torch
  draws it (so ``torch.initial_seed() == base_seed + worker_id``); ``get_worker_info()`` gives the
  worker's ``id``, ``num_workers``, ``seed`` and its copy of the ``dataset``; then
  ``worker_init_fn(worker_id)`` runs. Batch ``i`` of a pass is loaded by worker
  ``i % num_workers``, as torch assigns it, so per-worker random streams give torch's very samples,
  the same in every run. A worker that dies (a crash, the out-of-memory killer) is replaced by a
  new one (``worker_init_fn`` runs again with the same id and seed) and its batch is loaded again,
  so the epoch still yields every batch, in order; a batch whose workers die ``max_retries + 1``
  times raises :class:`~pyloader.WorkerDiedError`, a ``RuntimeError`` (torch's type) whose message
  names each worker's pid and signal. Each pass starts its own worker processes and ends them when
  it finishes, breaks, or is deleted, as torch's non-persistent workers do; a new pass also ends a
  previous unfinished pass of the same DataLoader, whose iterator then raises ``RuntimeError``.
- ``mode="thread"``: worker threads of this process, for a dataset that releases the GIL
  (numpy, file reads, decoders) and is safe to call from several threads at once. Nothing is
  pickled or forked. What differs from torch, because threads share one process: the dataset is
  one object for every worker (``worker_init_fn`` runs once in each worker thread, on that one
  object); ``get_worker_info()`` is ``None``; the global random generators are shared and not
  seeded per worker (random augmentations are not reproducible); ``multiprocessing_context`` is
  checked but unused; a crash in native code inside ``dataset[i]`` ends the whole process, where
  torch's worker processes (and ``mode="auto"``) report it as a ``RuntimeError``.

Errors are torch's: an exception raised by ``dataset[i]``, ``dataset.__getitems__`` or
``collate_fn`` reaches the loop as the same exception (its own type, so ``except KeyError:``
around the loop catches it), with a note naming the worker, the dataset index, the batch and the
epoch (process mode: and the worker's traceback), and the next ``next()`` continues with the
following batch. Torch rebuilds the exception as ``type(exc)(message)`` and raises a
``RuntimeError`` for a type that cannot be built that way; pyloader raises the exception itself,
so its type and arguments survive (process mode: an exception that cannot be pickled arrives as a
``RuntimeError`` naming it). A ``timeout`` raises torch's ``RuntimeError("DataLoader timed out
after N seconds")``.

``in_order=False`` is accepted: pyloader still delivers batches in order (one of the orders torch
may deliver them in), so a slow batch holds back the ones after it; the other workers keep
loading up to ``prefetch_factor * num_workers`` batches ahead meanwhile.

``persistent_workers=True`` (with ``num_workers > 0``), in every mode: the workers live as long
as the DataLoader, as torch's do. Each pass sends them its index batches (a few bytes per batch,
pickled once per pass), and they keep what they hold between passes: the worker processes'
copies of the dataset (opened files, caches), their random generators, ``worker_init_fn`` having
run once. No fork or thread start per epoch. A worker process that dies is replaced by one forked
from the zygote, which then receives the current pass's batches before its first one. A new pass
takes the workers over from an unfinished one, whose iterator then raises ``RuntimeError``.

An ``IterableDataset`` is loaded by pyloader as torch loads it (:mod:`._iterable`): worker process
``k`` iterates its own copy of the dataset (which may shard itself with ``get_worker_info()``),
batches its own items (``batch_size``, ``drop_last``, ``collate_fn``), and the batches arrive
round-robin over the workers, a worker that has ended dropping out: a :class:`~pyloader.Stream`
whose shards are the workers. Seeds, ``get_worker_info()``, ``worker_init_fn``, persistent
workers, torch's warning for batches past a ``len()`` taken before the pass, and DataPipe graphs
(seeded per pass from ``generator``, sharded per worker) are torch's. What differs: an exception
raised by a worker's iterator ends that worker's stream for the pass (torch's worker generator
ends too), and ``state_dict()`` is refused (torch has none; :class:`~pyloader.Stream` resumes
streams of shards). ``mode="thread"`` with ``num_workers > 0`` loads it with worker processes
all the same, and warns: torch keeps ``get_worker_info()`` per process, so worker threads could
not give each copy its own (each would read the whole dataset). With
``num_workers=0`` one worker thread iterates the dataset ahead of the loop, with no worker info,
as torch's main process does.

Distributed: when ``torch.distributed`` is initialized and no ``sampler``/``batch_sampler`` is
given, the default sampler becomes ``DistributedSampler(dataset, shuffle=shuffle, seed=...,
drop_last=drop_last)`` whose epoch advances with every pass (``set_epoch`` is called for you).
Pass any sampler explicitly to opt out.

The package, one idea per module: :mod:`._loader` (the DataLoader and its iterator: torch's epochs
on a Prefetcher), :mod:`._batching` (what the workers run for one batch; the natively gathered
arrays), :mod:`._codec` (tensors to marked arrays and back; torch's batch from a delivered one),
:mod:`._device` (``prefetch``: batches copied to a device ahead), :mod:`._iterable` (an
``IterableDataset`` as a Stream of torch's workers); the walk over nested batches is
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
