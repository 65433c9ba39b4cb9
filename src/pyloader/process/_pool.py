"""The consumer's side: the worker processes of one Prefetcher, and the errors they report.

:class:`WorkerPool` starts the zygote (:mod:`._zygote`), hands it the shared arena (and, for
``spawn`` or ``forkserver``, the pickled Sequence), and asks it for one worker per engine thread;
each engine thread then drives its worker over its own socket through the native ``ProcLoader``
(:meth:`WorkerPool.loader`), and calls :meth:`WorkerPool.replace` when that socket closes. Calls the
consumer makes on its Sequence between engines reach every worker as ``update`` messages, and a
worker started later gets the latest one first. :func:`worker_error` turns what a worker reported
(or how it died) into the exception the consumer raises.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable

from .. import _C
from .._errors import WorkerDiedError, add_note, batch_error
from ._fds import _disown, _own
from ._wire import _CTL_MAX, _HEADER, _UPDATE, _pickled, _Spec
from ._zygote import _zygote_main, describe_status

_ZYGOTE_TIMEOUT_S = 10.0
_UPDATE_TIMEOUT_S = 10.0

# The zygotes of live pools: multiprocessing.Process objects, which multiprocessing itself lists in
# multiprocessing.process._children. A process forked by the user's own os.fork() inherits that
# list, and at its exit multiprocessing's atexit handler would SIGTERM every daemonic "child" on it
# (our parent's zygote: its workers would be gone for the parent) and then fail to join it. So the
# child forgets them (the Prefetchers that own them are orphaned there: prefetcher._orphan_live).
_zygotes: weakref.WeakSet[Any] = weakref.WeakSet()


def _forget_zygotes_in_child() -> None:
    children = getattr(multiprocessing.process, "_children", None)
    for proc in list(_zygotes):
        if isinstance(children, set):
            children.discard(proc)
    _zygotes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_zygotes_in_child)


class WorkerPool:
    """The worker processes of one Prefetcher: a zygote and ``workers`` workers forked from it.

    Thread safety: :meth:`replace` is called from the engine's threads (with the GIL); one lock
    keeps conversations with the zygote whole.
    """

    def __init__(
        self,
        sequence: Any,
        *,
        workers: int,
        pool: Any,
        start_method: str,
        worker_init_fn: Callable[[int], Any] | None,
        seed: int,
        replay_hooks: bool,
    ) -> None:
        self._lock = threading.Lock()
        self._slots: list[tuple[int, int]] = []  # (fd, pid) per worker
        self._update: bytes | None = None  # the latest update message, for workers started later
        self._closed = False
        self._proc: Any = None
        self._ctl: socket.socket | None = None
        self.start_method = start_method
        spec = _Spec(sequence, worker_init_fn, seed, pool.arena_size, replay_hooks)
        blob_fd = None
        if start_method != "fork":
            # Not through multiprocessing's pipe: its writer holds the pipe's read end until the
            # write ends, so a zygote that dies before reading a large Sequence would hang us.
            spec, blob_fd = _pickled(spec, start_method)
        ctx: Any = multiprocessing.get_context(start_method)  # typeshed's BaseContext lacks Process
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _own(ours.fileno())
        self._ctl = ours
        try:
            proc = ctx.Process(target=_zygote_main, args=(theirs, spec), name="pyloader-zygote", daemon=True)
            proc.start()
            self._proc = proc  # only once started: close() joins it
            _zygotes.add(proc)
            theirs.close()
            ours.settimeout(_ZYGOTE_TIMEOUT_S)
            try:
                socket.send_fds(ours, [b"arena"], [pool.arena_fd])
                if blob_fd is not None:
                    socket.send_fds(ours, [b"spec"], [blob_fd])
            except OSError as exc:
                raise RuntimeError(f"pyloader's zygote process is gone ({self._zygote_end()}): {exc}") from None
            for slot in range(workers):
                self._slots.append(self._spawn(slot, starting=slot == 0))
        except BaseException:
            theirs.close()
            self.close()
            raise
        finally:
            if blob_fd is not None:
                os.close(blob_fd)  # the zygote has its own copy of the descriptor

    def _talk(self, message: tuple[Any, ...], starting: bool = False) -> tuple[Any, int | None]:
        """Sends a command to the zygote; returns its answer and the fd it passed (if any).

        ``starting``: the zygote's first answer, which a spawned zygote gives only once it has
        imported the Sequence's modules and unpickled it, however long that takes (torch's spawned
        workers are not timed either): waits while the zygote lives, in slices of
        :data:`_ZYGOTE_TIMEOUT_S`.
        """
        ctl = self._ctl
        if ctl is None:
            raise RuntimeError("the worker pool is closed")
        try:
            ctl.send(pickle.dumps(message))
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(ctl, _CTL_MAX, 1)
                    break
                except TimeoutError:
                    if not (starting and self._proc is not None and self._proc.is_alive()):
                        raise
        except OSError as exc:
            raise RuntimeError(f"pyloader's zygote process is gone ({self._zygote_end()}): {exc}") from None
        if not data:
            raise RuntimeError(f"pyloader's zygote process is gone ({self._zygote_end()})")
        answer = pickle.loads(data)
        if answer[0] == "error":
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"pyloader's zygote could not start a worker: {answer[1]}")
        return answer, (_own(fds[0]) if fds else None)

    def _zygote_end(self) -> str:
        proc = self._proc
        if proc is None:
            return "never started"
        proc.join(1.0)
        if proc.exitcode is None:
            return "not answering"
        if proc.exitcode < 0:
            return describe_status(-proc.exitcode)  # a signal number, as a wait status
        return f"exited with status {proc.exitcode}"

    def _spawn(self, slot: int, starting: bool = False) -> tuple[int, int]:
        with self._lock:
            answer, fd = self._talk(("spawn", slot), starting)
        assert fd is not None
        return fd, int(answer[1])

    def replace(self, slot: int, reason: str = "") -> tuple[int, int, str]:
        """Reaps the worker of ``slot`` (killing it if it still runs) and starts a new one.

        Returns:
            ``(fd, pid, how the old worker ended)`` (``reason`` instead, when given).
        """
        with self._lock:
            return self._replace_locked(slot, reason)

    def _replace_locked(self, slot: int, reason: str) -> tuple[int, int, str]:
        old_fd, old_pid = self._slots[slot]
        _disown(old_fd)
        try:
            os.close(old_fd)
        except OSError:
            pass
        self._slots[slot] = (-1, 0)
        answer, fd = self._talk(("replace", slot, old_pid))
        assert fd is not None
        self._slots[slot] = (fd, int(answer[1]))
        # The zygote's copy of the Sequence predates the updates: the newcomer gets the latest
        # (its first read, so before any batch). A fresh worker failing this is dead: the engine
        # finds its socket closed and replaces it again.
        if self._update is not None:
            _send_all(fd, self._update, _UPDATE_TIMEOUT_S)
        return fd, int(answer[1]), reason or f"process {old_pid} {answer[2]}"

    def update(self, name: str, args: tuple[Any, ...], hooks: int) -> None:
        """Calls ``sequence.<name>(*args)`` in every worker process, after the first ``hooks``
        ``on_epoch_end`` calls (the consumer's count); a worker started later gets the latest
        update before its first batch, so the method must *set* state, not add to it.

        Only while no engine uses the workers (between engines). A worker that cannot take the
        message (dead, or not reading for :data:`_UPDATE_TIMEOUT_S`) is replaced.
        """
        payload = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        message = _HEADER.pack(_UPDATE, 0, 0, 0, 0, hooks, len(payload)) + payload
        with self._lock:
            self._update = message
            for slot, (fd, _) in enumerate(self._slots):
                if fd < 0 or not _send_all(fd, message, _UPDATE_TIMEOUT_S):
                    self._replace_locked(slot, "")

    def fds(self) -> list[int]:
        return [fd for fd, _ in self._slots]

    def pids(self) -> list[int]:
        """The workers' pids, one per slot. A replacement in progress holds the lock until the
        new worker's pid is known, so this never sees the 0 that marks a slot in between (unless
        starting the replacement failed)."""
        with self._lock:
            return [pid for _, pid in self._slots]

    def loader(self, pool: Any, hook: Callable[[int], Any] | None, max_retries: int, hooks_before: int) -> Any:
        """A native ProcLoader over these workers, for one engine."""
        return _C.ProcLoader(self.fds(), self.pids(), pool, self.replace, hook, worker_error, max_retries,
                             hooks_before)

    def discard(self, slots: list[int]) -> None:
        """Replaces the workers of ``slots`` (left mid-conversation by a stopped engine)."""
        for slot in slots:
            self.replace(slot, reason="discarded")

    def close(self) -> None:
        """Ends every worker and the zygote, and closes every descriptor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        ctl, self._ctl = self._ctl, None
        with self._lock:
            if ctl is not None:
                try:
                    ctl.settimeout(_ZYGOTE_TIMEOUT_S)
                    ctl.send(pickle.dumps(("quit",)))
                    ctl.recv(_CTL_MAX)  # the zygote answers once every worker is reaped
                except OSError:
                    pass
                _disown(ctl.fileno())
                ctl.close()
            for fd, _ in self._slots:
                if fd >= 0:
                    _disown(fd)
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._slots = []
        proc = self._proc
        if proc is not None:
            proc.join(_ZYGOTE_TIMEOUT_S)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            proc.close()
            self._proc = None


def _send_all(fd: int, data: bytes, timeout: float) -> bool:
    """Writes ``data`` to the stream socket ``fd``; False if the peer is gone or ``timeout``
    seconds pass. ``fd`` stays blocking (the native loader reads it): the sends don't wait, a
    poll does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(fd))
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    try:
        while view:
            try:
                sent = sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(int(left * 1000) + 1):
                    return False
                continue
            view = view[sent:]
        return True
    except OSError:
        return False
    finally:
        sock.close()


def worker_error(kind: str, blob: bytes, index: int, epoch: int, position: int, worker: int,
                 pid: int) -> BaseException:
    """The exception the consumer sees for a batch a worker process failed (called natively)."""
    if kind == "died":
        return WorkerDiedError(
            f"loading Sequence index {index} (epoch {epoch}, position {position}) failed: "
            f"{blob.decode(errors='replace')}",
            index=index, epoch=epoch, position=position, worker=worker,
        )
    pickled, type_name, text, trace, pid = pickle.loads(blob)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"{type_name}: {text}")
    add_note(exc, f"Traceback in worker process {pid} (worker {worker}):\n{trace.rstrip()}")
    return batch_error(exc, index, epoch, position, worker)
