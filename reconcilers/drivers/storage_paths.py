"""Typed checks of the host storage paths VM disks depend on; no shell, nothing is changed.

- `iscsi_sessions()`: the kernel's open-iscsi sessions from sysfs
  (`/sys/class/iscsi_session/session*/{targetname,state}`; `LOGGED_IN` is healthy, `FAILED`
  means the connection is lost and iscsid is trying to recover it, `FREE` that it is gone);
- `check_file(path)`: the image's filesystem answers `statvfs` and its first block reads;
- `check_portal(portal)`: a TCP connection to an iSCSI portal (for disks QEMU opens itself);
- PVs: `reconcilers/drivers/lvm.py` (`Lvm.pvs`, a PV whose attr marks it missing).

A dead NFS server or a stalled iSCSI disk can block a read in the kernel for minutes: the file
check runs in a thread with a timeout, and a check still blocked from a previous call is not
started again (`busy`), so a hung path costs one thread, not one per look.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

SYSFS = Path("/sys")
LOGGED_IN = "LOGGED_IN"
READ_BYTES = 4096


@dataclass(frozen=True)
class IscsiSession:
    name: str
    """`session3`"""
    target: str
    """The target's IQN."""
    state: str
    """LOGGED_IN, FAILED or FREE (the kernel's iscsi_session_state names)."""


def iscsi_sessions(sysfs: Path = SYSFS) -> list[IscsiSession]:
    """Every open-iscsi session the kernel has (none without the iscsi transport class)."""
    sessions = []
    for entry in sorted((sysfs / "class" / "iscsi_session").glob("session*")):
        try:
            target = (entry / "targetname").read_text().strip()
            state = (entry / "state").read_text().strip()
        except OSError:  # the session went away while we looked
            continue
        sessions.append(IscsiSession(entry.name, target, state))
    return sessions


def _read_file(path: str) -> None:
    os.statvfs(os.path.dirname(path) or "/")
    with open(path, "rb", buffering=0) as image:
        image.read(READ_BYTES)


class FileCheck:
    """`check(path)`: None when the image reads, else why not; one blocked read per path."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._blocked: dict[str, asyncio.Future[None]] = {}

    def busy(self, path: str) -> bool:
        future = self._blocked.get(path)
        return future is not None and not future.done()

    async def check(self, path: str) -> str | None:
        if self.busy(path):
            return f"a read of {path} has been blocked for more than {self.timeout:g} s"
        future = asyncio.ensure_future(asyncio.to_thread(_read_file, path))
        future.add_done_callback(_consume)
        self._blocked[path] = future
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            return f"no answer reading {path} within {self.timeout:g} s"
        except OSError as error:
            return f"cannot read {path}: {error.strerror or error}"
        self._blocked.pop(path, None)
        return None


def _consume(future: asyncio.Future[None]) -> None:
    """Retrieve a late result (a read that timed out and failed afterwards)."""
    if not future.cancelled():
        future.exception()


async def check_portal(portal: str, timeout: float = 5.0) -> str | None:
    """None when `host:port` accepts a TCP connection within `timeout`, else why not."""
    host, _, port = portal.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except TimeoutError:
        return f"portal {portal} did not answer within {timeout:g} s"
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        return f"portal {portal}: {reason}"
    except ValueError as error:
        return f"portal {portal}: {error}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
