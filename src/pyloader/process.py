"""Process mode: worker processes that write batches straight into shared memory.

For a ``__getitem__`` that holds the GIL, threads cannot load in parallel; processes can. The
design (DESIGN.md, "Process mode"):

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
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import multiprocessing
import os
import pickle
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _C
from ._errors import WorkerDiedError, batch_error

__all__ = ["START_METHODS", "WorkerPool", "default_start_method", "worker_error"]

START_METHODS = ("fork", "spawn", "forkserver")
_HEADER = struct.Struct(_C.WIRE_HEADER[0])
assert _HEADER.size == _C.WIRE_HEADER[1], "process.py and proc_loader.h disagree on the header"
_LOAD, _SIZE, _ERROR, _WRITE, _DONE, _UPDATE, _INLINE = (
    _C.WIRE_KINDS[k] for k in ("load", "size", "error", "write", "done", "update", "inline")
)
_INLINE_MAX = 64 << 10  # batches up to this size travel in the answer: one round trip, no buffer wait
_CTL_MAX = 1 << 20
_ZYGOTE_TIMEOUT_S = 10.0
_UPDATE_TIMEOUT_S = 10.0

# File descriptors the consumer side holds (zygote sockets, worker sockets). A process forked from
# it (a zygote, or the user's own fork) must not keep them open, or a worker would never see its
# socket close: after a fork they are pointed at /dev/null (so that the fd numbers stay taken
# until whatever Python object holds them is gone).
_owned_fds: set[int] = set()


def _own(fd: int) -> int:
    _owned_fds.add(fd)
    return fd


def _disown(fd: int) -> None:
    _owned_fds.discard(fd)


def _after_fork_in_child() -> None:
    if not _owned_fds:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in list(_owned_fds):
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)
    _owned_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_start_method() -> str:
    """``"fork"`` where it exists (Linux, macOS), else ``"spawn"``."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def describe_status(status: int) -> str:
    """How a process ended, from its ``waitpid`` status, in plain words."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        hint = ""
        if sig == signal.SIGKILL:
            hint = "; the kernel's out-of-memory killer also sends SIGKILL"
        elif sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL):
            hint = "; a crash in native code"
        return f"killed by signal {sig} ({name}{hint})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


# ---- the consumer's side -----------------------------------------------------------------------


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
                n_seq, n_init = _BLOB_HEADER.unpack_from(view)
                start = _BLOB_HEADER.size
                self.sequence = pickle.loads(view[start:start + n_seq])
                self.worker_init_fn = pickle.loads(view[start + n_seq:start + n_seq + n_init])
            finally:
                view.release()
        self.pickled = False


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
        ctx = multiprocessing.get_context(start_method)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _own(ours.fileno())
        self._ctl = ours
        try:
            proc = ctx.Process(target=_zygote_main, args=(theirs, spec), name="pyloader-zygote", daemon=True)
            proc.start()
            self._proc = proc  # only once started: close() joins it
            theirs.close()
            ours.settimeout(_ZYGOTE_TIMEOUT_S)
            try:
                socket.send_fds(ours, [b"arena"], [pool.arena_fd])
                if blob_fd is not None:
                    socket.send_fds(ours, [b"spec"], [blob_fd])
            except OSError as exc:
                raise RuntimeError(f"pyloader's zygote process is gone ({self._zygote_end()}): {exc}") from None
            for slot in range(workers):
                self._slots.append(self._spawn(slot))
        except BaseException:
            theirs.close()
            self.close()
            raise
        finally:
            if blob_fd is not None:
                os.close(blob_fd)  # the zygote has its own copy of the descriptor

    def _talk(self, message: tuple[Any, ...]) -> tuple[Any, int | None]:
        """Sends a command to the zygote; returns its answer and the fd it passed (if any)."""
        ctl = self._ctl
        if ctl is None:
            raise RuntimeError("the worker pool is closed")
        try:
            ctl.send(pickle.dumps(message))
            data, fds, _, _ = socket.recv_fds(ctl, _CTL_MAX, 1)
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

    def _spawn(self, slot: int) -> tuple[int, int]:
        with self._lock:
            answer, fd = self._talk(("spawn", slot))
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


_BLOB_HEADER = struct.Struct("=QQ")  # sizes of the pickled Sequence and worker_init_fn


def _pickled(spec: _Spec, start_method: str) -> tuple[_Spec, int]:
    """``spec`` without its Sequence and worker_init_fn, and a descriptor of a memory file holding
    them pickled (see :meth:`_Spec.load`); or a TypeError that says which of them cannot be
    pickled and what to do."""
    from multiprocessing.reduction import ForkingPickler

    blobs = []
    for what, value in (("Sequence", spec.sequence), ("worker_init_fn", spec.worker_init_fn)):
        try:
            blobs.append(ForkingPickler.dumps(value))
        except Exception as exc:
            raise TypeError(
                f"start_method={start_method!r} starts worker processes from a fresh interpreter, "
                f"which receives the {what} pickled, and this {what} "
                f"({type(value).__name__}) cannot be pickled: {type(exc).__name__}: {exc}. "
                f"Make it picklable (module-level classes and functions, no open handles or "
                f"locks), or use start_method='fork'"
                + (" (the default on this system)" if default_start_method() == "fork" else "")
            ) from exc
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pyloader-sequence", os.MFD_CLOEXEC)
    else:
        fd = os.dup(tempfile.TemporaryFile().fileno())  # the file object closes its own descriptor
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(_BLOB_HEADER.pack(len(blobs[0]), len(blobs[1])))
            for blob in blobs:
                f.write(blob)
    except BaseException:
        os.close(fd)
        raise
    return dataclasses.replace(spec, sequence=None, worker_init_fn=None, pickled=True), fd


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
    exc.add_note(f"Traceback in worker process {pid} (worker {worker}):\n{trace.rstrip()}")
    return batch_error(exc, index, epoch, position, worker)


# ---- the zygote ----------------------------------------------------------------------------------


def _zygote_main(ctl: socket.socket, spec: _Spec) -> None:
    """Forks workers on request until told to quit or the consumer's end of ``ctl`` closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    ctl.settimeout(None)
    _, fds, _, _ = socket.recv_fds(ctl, 64, 1)
    arena = mmap.mmap(fds[0], spec.arena_size)  # shared: workers inherit this mapping
    os.close(fds[0])
    if spec.pickled:
        _, fds, _, _ = socket.recv_fds(ctl, 64, 1)
        try:
            spec.load(fds[0])
        finally:
            os.close(fds[0])
    address = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    children: dict[int, int] = {}  # pid -> slot
    quitting = False
    try:
        while True:
            try:
                data = ctl.recv(_CTL_MAX)
            except OSError:
                data = b""
            if not data:
                break  # the consumer is gone
            command = pickle.loads(data)
            if command[0] == "quit":
                quitting = True
                break
            death = ""
            if command[0] == "replace":
                old = command[2]
                if old in children:
                    try:
                        os.kill(old, signal.SIGKILL)  # it may live on (discarded, or hung)
                    except ProcessLookupError:
                        pass
                    _, status = os.waitpid(old, 0)
                    death = describe_status(status)
                    del children[old]
            slot = command[1]
            try:
                pid, fd = _fork_worker(ctl, spec, slot, address)
            except OSError as exc:
                ctl.send(pickle.dumps(("error", f"fork failed: {exc}")))
                continue
            children[pid] = slot
            socket.send_fds(ctl, [pickle.dumps(("ok", pid, death))], [fd])
            os.close(fd)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if quitting:
            try:
                ctl.send(pickle.dumps(("bye",)))
            except OSError:
                pass


def _fork_worker(ctl: socket.socket, spec: _Spec, slot: int, address: int) -> tuple[int, int]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            ours.close()
            ctl.close()
            _worker_main(theirs, spec, slot, address, zygote)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    theirs.close()
    return pid, ours.detach()


# ---- a worker ------------------------------------------------------------------------------------


def _die_with_parent(zygote: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: the kernel kills us with the zygote
        except (OSError, AttributeError):
            pass
    if os.getppid() != zygote:  # it died before prctl took effect
        os._exit(0)


def _seed(seed: int, worker_id: int) -> int:
    """Seeds ``random`` and numpy (and torch, if imported) from ``(seed, worker_id)``."""
    state = np.random.SeedSequence([seed, worker_id]).generate_state(2, np.uint64)
    value = int(state[0])
    random.seed(value)
    np.random.seed(int(state[1] % (1 << 32)))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(value % (1 << 63))
    return value


def _error_blob(exc: BaseException) -> bytes:
    trace = "".join(traceback.format_exception(exc))
    try:
        pickled: bytes | None = pickle.dumps(exc)
    except Exception:
        pickled = None
    return pickle.dumps((pickled, type(exc).__qualname__, str(exc), trace, os.getpid()))


def _worker_main(sock: socket.socket, spec: _Spec, slot: int, address: int, zygote: int) -> None:
    _die_with_parent(zygote)
    _seed(spec.seed, slot)
    init_error: BaseException | None = None
    if spec.worker_init_fn is not None:
        try:
            spec.worker_init_fn(slot)
        except BaseException as exc:  # reported with every batch this worker is asked for
            init_error = RuntimeError(f"worker_init_fn({slot}) raised {type(exc).__name__}: {exc}")
            init_error.__cause__ = exc
    sequence = spec.sequence
    getitem = sequence.__getitem__
    hook = getattr(sequence, "on_epoch_end", None) if spec.replay_hooks else None
    hooks_done = 0
    update_error: BaseException | None = None
    header = bytearray(_HEADER.size)
    pack, unpack = _HEADER.pack, _HEADER.unpack

    def receive() -> tuple[int, ...] | None:
        if sock.recv_into(header, _HEADER.size, socket.MSG_WAITALL) != _HEADER.size:
            return None
        return unpack(header)

    def replay(hooks: int) -> None:
        # State that on_epoch_end changes must reach this copy of the Sequence, in order.
        nonlocal hooks_done
        while hook is not None and hooks_done < hooks:
            hooks_done += 1
            try:
                hook()
            except Exception:
                pass  # the consumer's own run of the hook reports its error

    message = None
    while True:
        if message is None:
            message = receive()
            if message is None:
                return  # the consumer closed our socket: done
        kind, _, position, _, index, hooks, length = message
        message = None
        if kind == _UPDATE:  # a call the consumer made on its Sequence (WorkerPool.update)
            payload = bytearray(length)
            if length and sock.recv_into(payload, length, socket.MSG_WAITALL) != length:
                return
            replay(hooks)
            try:
                name, args = pickle.loads(payload)
                getattr(sequence, name)(*args)
                update_error = None
            except BaseException as exc:  # reported with every batch until the next update
                update_error = RuntimeError(f"updating the worker's copy of the Sequence failed: "
                                            f"{type(exc).__name__}: {exc}")
                update_error.__cause__ = exc
            continue
        if kind != _LOAD:
            continue  # a write for a batch that was abandoned
        try:
            if init_error is not None:
                raise init_error
            replay(hooks)
            if update_error is not None:
                raise update_error
            packed = _C.Packed(getitem(index), index)
            meta = pickle.dumps(packed.meta(), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            blob = _error_blob(exc)
            sock.sendall(pack(_ERROR, 0, 0, 0, 0, position, len(blob)) + blob)
            continue
        nbytes = packed.nbytes
        if nbytes <= _INLINE_MAX:
            data = packed.tobytes()
            sock.sendall(b"".join((pack(_SIZE, _INLINE, nbytes, len(meta), 0, position, len(meta) + nbytes),
                                   meta, data)))
            continue
        sock.sendall(pack(_SIZE, 0, nbytes, len(meta), 0, position, len(meta)) + meta)
        message = receive()
        if message is None:
            return
        kind, _, offset, capacity, for_position, _, _ = message
        if kind != _WRITE or for_position != position:
            continue  # abandoned: serve the new request
        message = None
        try:
            packed.write(address + offset, capacity)
        except BaseException as exc:
            blob = _error_blob(exc)
            sock.sendall(pack(_ERROR, 0, 0, 0, 0, position, len(blob)) + blob)
            continue
        sock.sendall(pack(_DONE, 0, 0, 0, 0, position, 0))
