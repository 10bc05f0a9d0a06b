"""What the simulated hosts (hosts.py), their lab (lab.py) and the harness's checkers share:
the lab's error, polling, netlink inside a host's namespace, and reading the machine's processes
(which PID namespace a process is in, which qemu guest it runs)."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from pyroute2 import IPRoute
from pyroute2.netlink import NETLINK_ROUTE

from reconcilers.drivers.netns import socket_in_netns


class LabError(RuntimeError):
    """A simulated host or the lab network could not be set up or driven."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 20 ms until it holds; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(0.02)


def route_inside(netns_name: str) -> IPRoute:
    """An IPRoute inside a named namespace, opened without pyroute2's fork (see drivers.netns)."""
    sock = socket_in_netns(netns_name, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    return IPRoute(fileno=sock.detach())


def link_index(ipr: IPRoute, name: str) -> int:
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        raise LabError(f"network link {name} does not exist")
    index: int = indexes[0]
    return index


@contextlib.contextmanager
def log_output(log_path: Path | None) -> Iterator[IO[bytes] | int]:
    if log_path is None:
        yield subprocess.DEVNULL
        return
    with open(log_path, "ab") as log:
        yield log


def wait_for_child(
    launcher: subprocess.Popen[bytes], timeout: float, what: str, output_of: Path | None = None
) -> int:
    """The PID of the process `launcher` (unshare or nsenter) forked.

    If it exits first, the LabError quotes the last lines of `output_of`, where it wrote.
    """
    children_file = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    children: list[str] = []

    def forked() -> bool:
        nonlocal children
        try:
            children = children_file.read_text().split()
        except OSError:
            children = []
        return bool(children) or launcher.poll() is not None

    wait_until(forked, timeout, what)
    if not children:
        said = ""
        if output_of is not None and output_of.exists():
            tail = output_of.read_text(errors="replace").splitlines()[-5:]
            said = f"; last output in {output_of}: " + " | ".join(tail)
        raise LabError(f"{what} exited at once with status {launcher.returncode}{said}")
    return int(children[0])


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def pid_namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:  # gone meanwhile
        return None


def qemu_guest_name(pid: int) -> str | None:
    """The libvirt guest name of a qemu process (`-name guest=NAME,...`), else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or not Path(argv[0].decode()).name.startswith("qemu-system"):
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"-name":
            for part in value.decode().split(","):
                if part.startswith("guest="):
                    return part.removeprefix("guest=")
            return value.decode().split(",")[0]
    return ""
