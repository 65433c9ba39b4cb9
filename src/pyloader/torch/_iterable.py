"""An ``IterableDataset`` loaded by pyloader: torch's workers as the shards of a :class:`~pyloader.Stream`.

Torch copies an ``IterableDataset`` into each of its ``num_workers`` worker processes; worker ``k``
iterates its copy (which may shard itself with ``get_worker_info()``), batches its own items
(``batch_size``, ``drop_last``, ``collate_fn``), and the consumer takes the workers' batches
round-robin, a worker that has ended dropping out. A Stream over ``num_workers`` shards, shard ``k``
read by worker process ``k``, does exactly that: the shard is :class:`_WorkerShard`, the worker's
copy of the dataset, set up by the same torch worker state the map-style path uses (seeds,
``get_worker_info()``, ``worker_init_fn``: :class:`._batching._ProcessWorkerInit`), and the per-shard
batching of the Stream is torch's fetcher's. So the batches, their order, the worker ids and seeds
are torch's for the same ``num_workers``.

With ``num_workers=0`` (torch: the main process iterates the dataset, ``get_worker_info()`` is
None) one worker thread iterates the dataset ahead of the loop, with no worker info, as in torch.
Worker *threads* cannot give each copy of the dataset its own ``get_worker_info()`` (torch keeps
it in a process-wide variable), so ``mode="thread"`` with ``num_workers > 0`` uses worker processes
for an ``IterableDataset`` all the same (the DataLoader warns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..collate import stack
from ._batching import _COLLATE, _CONVERT, _STACK
from ._codec import _holds_tensor, _pack


class _WorkerShard:
    """Shard ``k`` of the Stream: torch worker ``k``'s iteration of its copy of the dataset.

    Reopened (``iter()``) at every pass, as torch's worker re-creates its fetcher's iterator; the
    worker's state (seeds, ``get_worker_info()``) is set up once per worker process by
    ``_ProcessWorkerInit``.
    """

    def __init__(self, dataset: Any, convert: Callable[[Any], Any] | None) -> None:
        self.dataset = dataset
        self.convert = convert  # batch_size=None: collate_fn (or default_convert) per item

    def __iter__(self) -> Iterator[Any]:
        convert = self.convert
        if convert is None:
            return iter(self.dataset)
        return (_packed(convert(item)) for item in self.dataset)


class _Collate:
    """A worker's batch of items: stacked natively (torch's ``default_collate``), or the user's
    ``collate_fn``; tensors travel as marked numpy views (:mod:`._codec`)."""

    def __init__(self, kind: str, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.kind = kind
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> Any:
        if self.kind == _STACK:
            if items and _holds_tensor(items[0]):
                items = [_pack(s) for s in items]
            return stack(items)
        assert self.collate_fn is not None
        return _packed(self.collate_fn(items))


def _packed(batch: Any) -> Any:
    return _pack(batch) if _holds_tensor(batch) else batch


def stream_parts(dataset: Any, kind: str, collate_fn: Callable[[Any], Any] | None,
                 workers: int) -> tuple[list[_WorkerShard], _Collate | None]:
    """The Stream's shards (one per torch worker) and its collate (None: batch_size=None)."""
    if kind in (_STACK, _COLLATE):
        return [_WorkerShard(dataset, None) for _ in range(workers)], _Collate(kind, collate_fn)
    # batch_size=None: each item is a batch; default_convert's rules are applied by the consumer
    # (as on the map-style path), a custom collate_fn runs here.
    convert = _as_is if kind is _CONVERT else collate_fn
    return [_WorkerShard(dataset, convert) for _ in range(workers)], None


def _as_is(item: Any) -> Any:
    return item
