"""A datastore the simulated hosts share, each through its own FUSE mount, to stall on one host.

This kernel has no iSCSI initiator and no NFS, but it has FUSE: every host mounts the one backing
directory (`backing`, the "NAS") with `bindfs -f` at the same path (`path`) inside its own
private mount namespace, so a VM's file disk under `path` has the same name on every host, and
each host reaches it through its own FUSE daemon. `stall(host)` SIGSTOPs that host's bindfs (by
the PID `spawn` gave): every `statvfs`, `open` and `read` under `path` on that host blocks in the
kernel, as on a dead NFS server, while the other hosts read on; `resume(host)` continues it.

`unmount_all()` (teardown, also after a failure) continues what is stalled, unmounts on every
host still running (`fusermount -u -z`: a VM may still hold its image open) and ends each bindfs
by its PID. A host that died took its mount namespace, and so its mount, with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from e2e.harness.frozen import Frozen, alive
from e2e.harness.host_support import LabError, wait_until
from e2e.harness.hosts import SimulatedHost

TIMEOUT = 30.0


class FuseDatastore:
    """`backing` seen at `path` on every host mounted with `mount`."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "datastore-backing"
        self.path = root / "datastore"
        self._bindfs: dict[str, tuple[SimulatedHost, int]] = {}
        self._stalled: dict[str, Frozen] = {}

    def mount(self, host: SimulatedHost) -> int:
        """Mount the datastore on `host`; the PID of its bindfs."""
        self.backing.mkdir(exist_ok=True)
        self.path.mkdir(exist_ok=True)
        log_path = host.dir / "bindfs.log"
        pid = host.spawn(["bindfs", "-f", str(self.backing), str(self.path)], log_path=log_path)
        self._bindfs[host.name] = (host, pid)
        wait_until(lambda: self._mounted(pid) or not alive(pid), TIMEOUT, f"bindfs on {host.name}")
        if not alive(pid):
            raise LabError(f"bindfs on {host.name} exited: see {log_path}")
        return pid

    def pid(self, host: str) -> int:
        return self._bindfs[host][1]

    def stall(self, host: str) -> None:
        """SIGSTOP the host's bindfs: I/O under `path` blocks on that host."""
        self._stalled[host] = Frozen.freeze(self.pid(host))

    def resume(self, host: str) -> None:
        """Continue the host's bindfs (or let it be reaped, if its host was powered off)."""
        self._stalled.pop(host).thaw(f"bindfs of {host}")

    def unmount_all(self) -> None:
        """Continue, unmount and end every bindfs (by PID); continues past failures."""
        failures = []
        for name in list(self._stalled):
            try:
                self.resume(name)
            except TimeoutError as error:
                failures.append(str(error))
        for name, (host, pid) in list(self._bindfs.items()):
            try:
                self._unmount(host, pid)
            except (LabError, OSError, TimeoutError, subprocess.TimeoutExpired) as error:
                failures.append(f"bindfs on {name}: {error}")
            del self._bindfs[name]
        if failures:
            raise LabError("; ".join(failures))

    def _unmount(self, host: SimulatedHost, pid: int) -> None:
        if alive(pid) and host.is_running():
            umount = host.spawn(["fusermount", "-u", "-z", str(self.path)])
            host.wait_exit(umount, TIMEOUT)
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if not alive(pid):
                return
            os.kill(pid, signum)
            try:
                wait_until(lambda: not alive(pid), TIMEOUT, f"bindfs {pid} gone")
            except TimeoutError:
                if signum == signal.SIGKILL:
                    raise

    def _mounted(self, pid: int) -> bool:
        """Whether `path` is a mount point in the mount namespace of process `pid`."""
        try:
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            return False
        return any(line.split()[4] == str(self.path) for line in lines)
