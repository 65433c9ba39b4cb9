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
are its epochs (see :class:`._sources._Unbounded`), and starts again from batch 0 when Keras makes a new
iteration (the one-batch read that builds a model is rewound as above). It has no epochs to load,
so Keras's own ``on_epoch_begin``/``on_epoch_end`` calls reach it, when Keras makes them.

On the torch backend, numpy batches are handed over as ``torch.from_numpy`` views of pyloader's
buffers, which Keras's ``convert_to_tensor`` passes through (it would copy a numpy array). The other
backends take the numpy batches as they are (jax copies them to its device arrays; tensorflow's
``from_generator`` copies them into tensors), as they take a numpy batch from Keras's own path.
On tensorflow, Keras reads them through a :class:`._follow._KerasFeed` that the dataset gives its adapter as
the enqueuer, so that Keras builds its ``tf.data`` pipeline as for its own enqueuer, without a
second prefetch queue and without tf.data's autotuning (whose thread made ``fit`` return seconds
late); the batches, their order, hooks and errors are those of the generator path.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

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

from .._errors import BatchError
from ..streams import Stream, is_stream_like
from ._dataset import PrefetchedDataset

__all__ = ["PrefetchedDataset", "prefetch"]
# The public class keeps the module users import it from (in reprs, tracebacks and pickles).
PrefetchedDataset.__module__ = __name__

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
    workers: int | str | None = None,
    depth: int | str | None = None,
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
            ``workers``; for any other Sequence ``"auto"``, as :class:`~pyloader.Prefetcher`'s
            (autotuned while it loads, in thread mode unless ``mode`` says otherwise).
        depth: batches loaded ahead. Default: a PyDataset's ``max_queue_size`` (for a
            ``max_queue_size`` of 0, which Keras takes as unbounded, ``2 * workers``); for any
            other Sequence ``"auto"``.
        mode: ``"thread"``, or ``"process"`` for a ``__getitem__`` that holds the GIL (worker
            processes forked with a copy of the Sequence; see the package docstring). Default:
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
        if workers == "auto":  # nothing to tune: one thread reads one generator
            workers = None
        if isinstance(workers, str):
            raise ValueError(f"workers must be None, 'auto' or an integer >= 1, got {workers!r}")
        options: dict[str, Any] = {} if mode is None else {"mode": mode}
        return _prefetched_generator(Stream(
            [sequence], workers=workers, depth=depth, pin=pin, timeout=timeout,
            max_pool_bytes=max_pool_bytes, **options,
        ))
    keras_workers, multiprocessing, queue_size = _keras_settings(sequence)
    # A PyDataset's settings are the user's; any other Sequence is autotuned in thread mode, as
    # Prefetcher(seq) is (the number of threads and the depth; processes only when asked for).
    if workers is None:
        workers = "auto" if keras_workers is None else keras_workers
    if depth is None:
        depth = "auto" if keras_workers is None else queue_size
    if mode is None:
        mode = "process" if multiprocessing else "thread"
    if seed is None and shard is None:
        seed = random.getrandbits(63)
    return PrefetchedDataset(
        sequence, shuffle=shuffle, workers=workers, depth=depth, mode=mode, seed=seed, shard=shard,
        drop_last=drop_last, pin=pin, timeout=timeout, max_pool_bytes=max_pool_bytes,
        start_method=start_method, worker_init_fn=worker_init_fn, max_retries=max_retries,
    )
