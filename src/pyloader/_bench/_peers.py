"""Grain's and SPDL's pipelines for the streamed workloads, as their docs build them.

Imported only by the ``grain-stream`` and ``spdl-stream`` loaders (each needs its package).
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
