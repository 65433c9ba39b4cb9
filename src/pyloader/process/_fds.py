"""The file descriptors the consumer's side owns, and why a forked child must drop them.

The consumer holds a socket to each zygote and to each worker. A process forked from it (a zygote
started with ``fork``, or the user's own ``os.fork``) inherits them, and if it kept them open a
worker would never see its socket close when the consumer closes its end. So every such descriptor
is registered here (:func:`_own`) and, in the child after any fork, pointed at ``/dev/null``: the
fd numbers stay taken until whatever Python object holds them is gone, but the sockets are shut.
"""

from __future__ import annotations

import os

_owned_fds: set[int] = set()


def _own(fd: int) -> int:
    """Registers ``fd`` as the consumer's (closed in forked children); returns it."""
    _owned_fds.add(fd)
    return fd


def _disown(fd: int) -> None:
    """Forgets ``fd`` (call before closing it, so that a later fd of that number is not hit)."""
    _owned_fds.discard(fd)


def _after_fork_in_child() -> None:
    """Points every owned fd at ``/dev/null`` (the child of any fork of this process)."""
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
