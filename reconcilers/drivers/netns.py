"""Sockets inside a named network namespace, opened without fork().

pyroute2 enters a namespace in a forked child process. Forking a process that runs other
threads (gRPC's for etcd, libvirt's event loop) is unsafe: the child inherits locks held by
threads that do not exist in it, and it crashed now and then (a segmentation fault in the
child, then a missing socket in the parent). setns(2) with CLONE_NEWNET changes the namespace
of the *calling thread* only, so a short-lived thread enters the namespace, opens the socket
and ends; the socket keeps the namespace it was created in, and no other thread ever moves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import threading
from pathlib import Path

NETNS_DIR = Path("/run/netns")
"""Where `ip netns add` mounts named namespaces."""

_CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """The namespace does not exist or cannot be entered."""


def netns_path(name: str) -> Path:
    """The bind mount of namespace `name`; refuses names that could escape NETNS_DIR."""
    if not _NAME.fullmatch(name):
        raise NetnsError(errno.EINVAL, f"invalid network namespace name {name!r}")
    return NETNS_DIR / name


def socket_in_netns(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket in namespace `name` (blocking for about a thread's start-up)."""
    path = netns_path(name)
    outcome: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NetnsError(
                    errno.ENOENT, f"network namespace {name!r} does not exist"
                ) from None
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise NetnsError(
                        code, f"cannot enter network namespace {name!r}: {os.strerror(code)}"
                    )
            finally:
                os.close(fd)
            outcome.append(socket.socket(family, kind, proto))
        except BaseException as error:  # handed to the caller's thread below
            outcome.append(error)

    # A fresh thread, never a pooled one: it ends inside the namespace and is not reused.
    thread = threading.Thread(target=enter_and_open, name=f"netns {name}", daemon=True)
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result
