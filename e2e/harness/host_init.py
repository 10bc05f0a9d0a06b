"""A simulated host's init: PID 1 of its PID namespace (`python -m e2e.harness.host_init
init`, started by `SimulatedHost.start`). It gives the host its own /run and libvirt state,
starts libvirtd and then only reaps orphans."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

HOST_STATE_MOUNTS = {
    "etc-libvirt": "/etc/libvirt",
    "run-libvirt": "/run/libvirt",
    "lib-libvirt": "/var/lib/libvirt",
    "log-libvirt": "/var/log/libvirt",
    "cache-libvirt": "/var/cache/libvirt",
}
"""Inside a host these paths are bind mounts of the host's own directories (<host dir>/<name>)."""


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def host_init(host_dir: Path, hostname: str) -> NoReturn:
    """Give the host its own /run and libvirt state, start libvirtd, then reap forever."""
    socket.sethostname(hostname)
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    for directory, mount_point in HOST_STATE_MOUNTS.items():
        os.makedirs(mount_point, exist_ok=True)
        _mount("--bind", str(host_dir / directory), mount_point)
    with open(host_dir / "libvirtd.log", "ab") as log:
        subprocess.Popen(["libvirtd", "--listen"], stdout=log, stderr=subprocess.STDOUT)
    # Orphans (qemu, processes whose nsenter died) are re-parented to us: reap them all.
    # SIGCHLD stays blocked so one arriving between wait() and sigwaitinfo() is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            os.wait()
        except ChildProcessError:
            signal.sigwaitinfo({signal.SIGCHLD})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.harness.host_init")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="run as a simulated host's namespace init")
    init.add_argument("--host-dir", type=Path, required=True)
    init.add_argument("--hostname", required=True)
    args = parser.parse_args(argv)
    host_init(args.host_dir, args.hostname)


if __name__ == "__main__":
    sys.exit(main())
