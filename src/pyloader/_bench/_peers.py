"""Grain's and SPDL's pipelines, as their docs build them: over a map-style source (a Sequence
of batches: ``grain``, ``grain-process``, ``spdl``, ``spdl-unordered``) and over streamed shards
(``grain-stream``, ``spdl-stream``).

Imported only by those loaders (each needs its package).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def _collate(items: list[Any]) -> Any:
    """``np.stack`` per field, as the streams' batches are (a tuple of fields, or one field)."""
    if isinstance(items[0], tuple):
        return tuple(np.stack([np.asarray(it[k]) for it in items]) for k in range(len(items[0])))
    return np.asarray(items)


def grain_stream(shards: list[Any], batch_size: int, workers: int) -> Any:
    """An iterable of batches: Grain's interleave of the shards, batched, prefetched on a thread."""
    import grain

    class Shard(grain.IterDataset):
        def __init__(self, shard: Any) -> None:
            super().__init__()
            self.shard = shard

        def __iter__(self) -> grain.DatasetIterator:
            return ShardIterator(self.shard)

    class ShardIterator(grain.DatasetIterator):
        def __init__(self, shard: Any) -> None:
            super().__init__()
            self.items = iter(shard)

        def __next__(self) -> Any:
            return next(self.items)

        def get_state(self) -> dict[str, Any]:
            return {}

        def set_state(self, state: dict[str, Any]) -> None:
            pass

    ds = grain.experimental.InterleaveIterDataset([Shard(s) for s in shards], cycle_length=workers,
                                                 iter_buffer_size=2)
    ds = ds.batch(batch_size, batch_fn=_collate)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)


def spdl_stream(shards: list[Any], batch_size: int, workers: int) -> Iterator[Any]:
    """One epoch of batches from an SPDL pipeline over the shards (completion order)."""
    from spdl.pipeline import PipelineBuilder

    def read(shard: Any) -> Iterator[Any]:
        yield from shard

    pipeline = (
        PipelineBuilder()
        .add_source(shards)
        .pipe(read, concurrency=workers)
        .aggregate(batch_size)
        .pipe(_collate)
        .add_sink(2)
        .build(num_threads=workers)
    )
    with pipeline.auto_stop():
        yield from pipeline.get_iterator()


def grain_map(seq: Any, workers: int, processes: bool) -> Any:
    """An iterable of one epoch's batches, in order: Grain's Dataset API over a map-style source,
    ``MapDataset.source(seq).to_iter_dataset(ReadOptions(num_threads=W))`` (its read threads and
    default read-ahead), or for Python-heavy loads (``processes``) ``to_iter_dataset()`` then
    ``mp_prefetch(MultiprocessingOptions(num_workers=W))``, the worker processes its docs
    recommend."""
    import grain

    source = grain.MapDataset.source(seq)
    if not processes:
        return source.to_iter_dataset(grain.ReadOptions(num_threads=workers))
    return source.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def spdl_map(seq: Any, workers: int, ordered: bool) -> Iterator[Any]:
    """One epoch of batches from an SPDL pipeline over a map-style source: the indices as source,
    ``seq.__getitem__`` as a stage with ``concurrency=W`` on ``W`` threads, in input order
    (``ordered``) or completion order, a sink of two batches."""
    from spdl.pipeline import PipelineBuilder

    pipeline = (
        PipelineBuilder()
        .add_source(range(len(seq)))
        .pipe(seq.__getitem__, concurrency=workers, output_order="input" if ordered else "completion")
        .add_sink(2)
        .build(num_threads=workers)
    )
    with pipeline.auto_stop():
        yield from pipeline.get_iterator()
