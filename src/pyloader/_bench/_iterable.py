"""The torch side of the streamed workloads: their shards as one ``IterableDataset``.

Imported only by the loaders that run torch. Worker ``k`` of ``num_workers`` reads shards ``k``,
``k + num_workers``, ... one after the other, the usual way to shard an ``IterableDataset`` over
torch's workers (WebDataset's ``split_by_worker``), and batches its own items.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info


class ShardedIterable(IterableDataset):
    """The items of ``shards``, split between torch's workers by worker id."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            yield from shard
