"""The zygote: a single-threaded process that forks the workers, on the consumer's request.

Started by :class:`~._pool.WorkerPool` before any engine thread runs (with ``fork``, a copy of the
consumer taken then; with ``spawn`` or ``forkserver``, a fresh interpreter that unpickles the
:class:`~._wire._Spec`), it maps the shared arena, then serves its control socket: each ``spawn``
or ``replace`` forks a worker (:func:`~._worker._worker_main`) and passes back the worker's socket;
a replaced worker is killed if it still runs and reaped, and how it ended is part of the answer. So
a replacement never forks the multi-threaded consumer. When the consumer's end of the socket
closes, or on ``quit``, the zygote kills and reaps every worker it forked.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import signal
import socket
import sys
import traceback

from ._wire import _CTL_MAX, _Spec
from ._worker import _worker_main


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
        except ConnectionError:
            pass  # the consumer closed our socket with a message unread (an abandoned pass): done
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

