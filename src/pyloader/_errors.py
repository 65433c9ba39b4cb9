"""Errors and warnings that pyloader raises, and how worker errors reach the consumer.

An exception raised by ``__getitem__(i)`` on a worker is recorded against its position and raised
when the consumer reaches that position, as a :class:`BatchError` whose ``__cause__`` is the
original exception (with its original traceback). Input errors that pyloader itself detects
(``__getitem__`` returned ``None``) are raised as they are: ``pyloader._C.BatchLayoutError``, a
``TypeError`` naming the index. Errors from the native core are recognised by their registered
types, never by their message text.

Every error type here survives ``pickle`` (errors cross processes in multi-process training): the
keyword-only attributes travel with the message (:meth:`BatchError.__reduce__`).
"""

from __future__ import annotations

from typing import Any

from . import _C


class BatchError(RuntimeError):
    """``__getitem__`` raised while loading a batch.

    Attributes:
        index: the Sequence index that failed.
        epoch: the epoch it belonged to.
        position: its position in the loader's global order.
        worker: the worker that ran it.
    """

    def __init__(self, message: str, *, index: int = -1, epoch: int = -1, position: int = -1,
                 worker: int = -1) -> None:
        # The attributes default to -1 (unknown) so that code that rebuilds an exception from its
        # message alone, as torch's ExceptionWrapper does with ``type(exc)(message)``, can.
        super().__init__(message)
        self.index = index
        self.epoch = epoch
        self.position = position
        self.worker = worker

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException's own reduce calls cls(*args), which lacks the keyword-only attributes.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Unpickles a :class:`BatchError` (or a subclass): its message, attributes and notes."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class WorkerDiedError(BatchError):
    """Process mode: the worker processes that tried to load a batch died, ``max_retries + 1``
    times. The message says how each ended (signal, exit status)."""


class EpochEndError(RuntimeError):
    """The Sequence's ``on_epoch_end()`` raised. ``__cause__`` is the original exception."""


class PoolExhaustedWarning(RuntimeWarning):
    """Workers wait for buffers because every buffer holds a batch that is still referenced."""


#: The batch the consumer needs next waited :attr:`Prefetcher.pool_wait_s <pyloader.Prefetcher>`
#: for a buffer while every buffer holds a batch the user still references (after a
#: :class:`PoolExhaustedWarning`). A ``MemoryError``: Python's error for memory that deleting some
#: objects can rescue, which is the remedy here. The message says how many batches are held, the
#: bound and how to raise it; after dropping references, ``next()`` goes on with the same batch.
#: Raised by the native core (``pyloader._C.PoolExhaustedError``, registered in ``errors.cpp``).
PoolExhaustedError = _C.PoolExhaustedError


class StallWarning(RuntimeWarning):
    """A batch has not arrived for :attr:`Prefetcher.stall_warning_s <pyloader.Prefetcher>`
    (the message names the batch, its epoch, the worker - thread, or process and whether it is
    stopped - and how long), or ``close()`` abandoned a worker thread stuck in user code."""


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``; before Python 3.11 (no notes) the note is kept in ``__notes__`` as
    PEP 678 specifies, where tracebacks of those versions do not show it."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        notes = getattr(exc, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            exc.__notes__ = notes  # type: ignore[attr-defined]
        notes.append(note)


def batch_error(exc: BaseException, index: int, epoch: int, position: int, worker: int) -> BaseException:
    """Builds the exception the consumer sees for a failed batch (called by the native core)."""
    if isinstance(exc, _C.BatchLayoutError):
        return exc  # pyloader's own check of the returned value: a TypeError naming the index
    error = BatchError(
        f"__getitem__({index}) raised {type(exc).__name__}: {exc} "
        f"(epoch {epoch}, worker {worker}); the original traceback is above",
        index=index,
        epoch=epoch,
        position=position,
        worker=worker,
    )
    error.__cause__ = exc
    return error
