"""Device prefetch: a batch Sequence to torch tensors, copied to the device ahead of the consumer.

:func:`prefetch` / :class:`DevicePrefetcher` put a :class:`~pyloader.Prefetcher` in front of the
device: the delivered arrays become tensor views of the slots (:func:`~._codec._as_tensors`), and
on CUDA a side stream copies each batch ``ahead`` batches early; the class docstring gives the
stream and lifetime rules that make handing the copies over safe.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import _checks, _tree
from .._closing import Closing
from ..prefetcher import Prefetcher
from ._codec import _as_tensors


def _record_stream(t: torch.Tensor, *, stream: Any) -> None:
    t.record_stream(stream)


def _tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``fn`` of every tensor of a batch, the structure unchanged (other leaves stay)."""
    return _tree.map_structure(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, obj)


class DevicePrefetcher(Closing):
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
        ahead = _checks.whole("ahead", ahead, 1)
        if self._cuda:
            assert self.device is not None
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
                _tree_map(functools.partial(_record_stream, stream=consumer), on_device)
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
