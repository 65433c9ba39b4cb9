"""What the consumer, the zygote and the workers agree on: start methods, messages, the spec.

- A worker's socket carries fixed-size headers (:data:`_HEADER`, of the kinds in ``_C.WIRE_KINDS``)
  whose layout ``csrc/core/proc_loader.h`` defines: the native loader of the consumer speaks it,
  and so does :func:`~._worker._worker_main`. A failed batch's payload is :func:`_error_blob`.
- The zygote's control socket carries pickled tuples (``("spawn", slot)``, ``("replace", slot,
  pid)``, ``("quit",)``; answers ``("ok", pid, how the old worker ended)``, ``("error", text)``,
  ``("bye",)``) of at most :data:`_CTL_MAX` bytes, with the new worker's socket passed alongside.
- :class:`_Spec` is what a zygote needs to make workers. With ``spawn`` or ``forkserver`` its
  Sequence and ``worker_init_fn`` travel apart, pickled once (together) into a memory file
  (:func:`_pickled` writes it, :meth:`_Spec.load` reads it in the zygote).
"""

from __future__ import annotations

import dataclasses
import mmap
import multiprocessing
import os
import pickle
import struct
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from .. import _C

START_METHODS = ("fork", "spawn", "forkserver")
_HEADER = struct.Struct(_C.WIRE_HEADER[0])
assert _HEADER.size == _C.WIRE_HEADER[1], "process/_wire.py and proc_loader.h disagree on the header"
_LOAD, _SIZE, _ERROR, _WRITE, _DONE, _UPDATE, _INLINE = (
    _C.WIRE_KINDS[k] for k in ("load", "size", "error", "write", "done", "update", "inline")
)
_INLINE_MAX = 64 << 10  # batches up to this size travel in the answer: one round trip, no buffer wait
_CTL_MAX = 1 << 20
_BLOB_HEADER = struct.Struct("=Q")  # size of the pickled (Sequence, worker_init_fn)


def default_start_method() -> str:
    """``"fork"`` where it exists (Linux, macOS), else ``"spawn"``."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass
class _Spec:
    """What a zygote needs to make workers (the argument of its Process: pickled for spawn and
    forkserver, which get the Sequence apart, see ``pickled``)."""

    sequence: Any
    worker_init_fn: Callable[[int], Any] | None
    seed: int
    arena_size: int
    replay_hooks: bool
    # spawn and forkserver: ``sequence`` and ``worker_init_fn`` travel apart, pickled once (by the
    # check that they can be) into a memory file whose descriptor the zygote receives on its
    # control socket; they are None here until :meth:`load`.
    pickled: bool = False

    def load(self, fd: int) -> None:
        """In the zygote: unpickles the Sequence and worker_init_fn from :func:`_pickled`'s file."""
        with mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                (n,) = _BLOB_HEADER.unpack_from(view)
                start = _BLOB_HEADER.size
                self.sequence, self.worker_init_fn = pickle.loads(view[start:start + n])
            finally:
                view.release()
        self.pickled = False


class UnpicklableError(TypeError):
    """Spawn or forkserver was asked for, and the Sequence or worker_init_fn cannot be pickled.

    A ``TypeError`` (what it was before it had a type of its own); the torch adapter recognises
    it to say the same in torch's terms.
    """


def _pickled(spec: _Spec, start_method: str) -> tuple[_Spec, int]:
    """``spec`` without its Sequence and worker_init_fn, and a descriptor of a memory file holding
    them pickled (see :meth:`_Spec.load`); or an :class:`UnpicklableError` that says which of
    them cannot be pickled and what to do.

    The two are pickled together, as one tuple, so that an object they share (the torch adapter's
    ``worker_init_fn`` holds the dataset its Sequence loads from) is one object in the worker too,
    as it is with ``fork``.
    """
    from multiprocessing.reduction import ForkingPickler

    try:
        blob = ForkingPickler.dumps((spec.sequence, spec.worker_init_fn))
    except Exception:
        for what, value in (("Sequence", spec.sequence), ("worker_init_fn", spec.worker_init_fn)):
            try:
                ForkingPickler.dumps(value)
            except Exception as exc:
                raise UnpicklableError(
                    f"start_method={start_method!r} starts worker processes from a fresh interpreter, "
                    f"which receives the {what} pickled, and this {what} "
                    f"({type(value).__name__}) cannot be pickled: {type(exc).__name__}: {exc}. "
                    f"Make it picklable (module-level classes and functions, no open handles or "
                    f"locks), or use start_method='fork'"
                    + (" (the default on this system)" if default_start_method() == "fork" else "")
                ) from exc
        raise  # each pickles alone but not together: say what pickle said
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pyloader-sequence", os.MFD_CLOEXEC)
    else:
        fd = os.dup(tempfile.TemporaryFile().fileno())  # the file object closes its own descriptor
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(_BLOB_HEADER.pack(len(blob)))
            f.write(blob)
    except BaseException:
        os.close(fd)
        raise
    return dataclasses.replace(spec, sequence=None, worker_init_fn=None, pickled=True), fd


def _error_blob(exc: BaseException) -> bytes:
    """A worker's report of ``exc``: the exception pickled if it can be, its type name, text and
    traceback, and the worker's pid (read by :func:`~._pool.worker_error`)."""
    trace = "".join(traceback.format_exception(exc))
    try:
        pickled: bytes | None = pickle.dumps(exc)
    except Exception:
        pickled = None
    return pickle.dumps((pickled, type(exc).__qualname__, str(exc), trace, os.getpid()))
