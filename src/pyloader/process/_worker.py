"""A worker process: loads the batches its consumer thread asks for, into the shared arena.

Forked by the zygote (:mod:`._zygote`), a worker first arranges to die with it
(``PR_SET_PDEATHSIG``), seeds ``random``, numpy and torch from ``(seed, worker id)``
(:func:`_seed`), and runs ``worker_init_fn``. It then answers its socket (the protocol of
``csrc/core/proc_loader.h``, headers of :mod:`._wire`): for each ``load`` it packs
``sequence[index]`` natively, sends it inline when small, else asks for a buffer and writes the
arrays straight into the arena at the offset it is given; an ``update`` replays the consumer's
``on_epoch_end`` calls and the call it made on its Sequence. An error travels as
:func:`~._wire._error_blob`; a worker never stops for one. It returns when its socket closes.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import random
import signal
import socket
import sys

import numpy as np

from .. import _C
from .._errors import add_note
from ._wire import (
    _DONE,
    _ERROR,
    _HEADER,
    _INLINE,
    _INLINE_MAX,
    _LOAD,
    _SIZE,
    _UPDATE,
    _WRITE,
    _error_blob,
    _Spec,
)


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


def _worker_main(sock: socket.socket, spec: _Spec, slot: int, address: int, zygote: int) -> None:
    _die_with_parent(zygote)
    _seed(spec.seed, slot)
    init_error: BaseException | None = None
    if spec.worker_init_fn is not None:
        try:
            spec.worker_init_fn(slot)
        except BaseException as exc:  # reported with every batch this worker is asked for
            init_error = exc  # its own type, as torch's worker loop reports it
            add_note(exc, f"raised by worker_init_fn({slot}) in worker process {os.getpid()}")
    sequence = spec.sequence
    getitem = sequence.__getitem__
    stream = bool(getattr(sequence, "_pyloader_stream_source", False))  # keyed (epoch, index)
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
        kind, _, position, epoch, index, hooks, length = message
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
            packed = _C.Packed(getitem((epoch, index)) if stream else getitem(index), index)
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
