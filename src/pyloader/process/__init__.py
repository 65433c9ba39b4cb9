"""Process mode: worker processes that write batches straight into shared memory.

For a ``__getitem__`` that holds the GIL, threads cannot load in parallel; processes can. The
design (ARCHITECTURE.md, "Process mode"):

- The buffer pool lives in one shared-memory arena (``memfd_create``, made by the native
  ``BufferPool``): a worker writes a batch's arrays into a buffer the consumer's process leased,
  and the consumer receives views on it. No array is pickled; only the batch's layout (the
  structure, dtypes, shapes, and any non-array values) crosses, pickled, on a socket.
- Each engine worker thread of the consumer's process drives one worker process over its own
  socket (``csrc/core/proc_loader.h`` has the protocol). A worker that dies closes its socket, so
  the thread notices at once; it then has :class:`WorkerPool` start a replacement and loads the
  position again from the start. Every batch is delivered exactly once, in order.
- Workers are forked from a *zygote*: a process started when the Prefetcher is made, before any
  of its threads run, that stays single-threaded and does nothing but fork workers on request. So
  a replacement never forks the (multi-threaded) consumer process. With ``start_method="spawn"``
  or ``"forkserver"`` the zygote is a fresh interpreter and receives the Sequence pickled.
- Nothing outlives the consumer: a worker exits when its socket closes and is killed by the
  kernel when the zygote dies (``PR_SET_PDEATHSIG``); the zygote kills its workers when its own
  socket to the consumer closes, which the kernel does however the consumer ends.

The package, one role per module: :mod:`._pool` (the consumer's side: :class:`WorkerPool`, which
starts the zygote and asks it for workers, and :func:`worker_error`), :mod:`._zygote` (the zygote's
loop, which forks the workers), :mod:`._worker` (a worker's loop and its seeding), and what they
share: :mod:`._wire` (the messages, the header shared with ``proc_loader.h``, the zygote's spec)
and :mod:`._fds` (the descriptors the consumer owns, closed in any process forked from it).
"""

from __future__ import annotations

from ._pool import WorkerPool, worker_error
from ._wire import START_METHODS, UnpicklableError, default_start_method
from ._zygote import describe_status  # noqa: F401 - pyloader.process.describe_status, as before

__all__ = ["START_METHODS", "UnpicklableError", "WorkerPool", "default_start_method", "worker_error"]
