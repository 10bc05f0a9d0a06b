"""Typed checks of the host storage paths VM disks depend on; no shell, nothing is changed.

- `iscsi_sessions()`: the kernel's open-iscsi sessions from sysfs
  (`/sys/class/iscsi_session/session*/{targetname,state}`; `LOGGED_IN` is healthy, `FAILED`
  means the connection is lost and iscsid is trying to recover it, `FREE` that it is gone);
- `check_file(path)`: the image's filesystem answers `statvfs` and its first block reads;
- `check_portal(portal)`: a TCP connection to an iSCSI portal (for disks QEMU opens itself);
- PVs: `reconcilers/drivers/lvm.py` (`Lvm.pvs`, a PV whose attr marks it missing).

A dead NFS server or a stalled iSCSI disk can block a read in the kernel for minutes: the file
check runs in a daemon thread with a timeout (`blocked_calls`: a read that never returns does not
keep the agent from exiting), and a check still blocked from a previous call is not started
again (`busy`), so a hung path costs one thread, not one per look. `check_many` reads
many images in one thread (one hop per look, not one per image) and falls back to one thread
per image only for those its thread did not reach in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reconcilers.drivers import blocked_calls

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


def _unreadable(path: str, error: OSError) -> str:
    return f"cannot read {path}: {error.strerror or error}"


def _read_files(paths: Sequence[str], outcomes: list[str | None]) -> None:
    """`_read_file` of each path in turn, each outcome appended to `outcomes` once known."""
    for path in paths:
        try:
            _read_file(path)
            outcomes.append(None)
        except OSError as error:
            outcomes.append(_unreadable(path, error))


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
            return self._blocked_for(path)
        future = blocked_calls.start(_read_file, path)
        future.add_done_callback(_consume)
        self._blocked[path] = future
        try:
            await blocked_calls.outcome(future, self.timeout)
        except TimeoutError:
            return f"no answer reading {path} within {self.timeout:g} s"
        except OSError as error:
            return _unreadable(path, error)
        self._blocked.pop(path, None)
        return None

    async def check_many(self, paths: Sequence[str]) -> dict[str, str | None]:
        """`check` of each path, with the reads made one after the other in one thread: a look
        at hundreds of images costs one thread hop, not one each. If that thread has not ended
        within the timeout, the path it is stuck on is reported (and busy until its read ends)
        and the paths it has not reached are checked one by one, concurrently."""
        problems: dict[str, str | None] = {p: self._blocked_for(p) for p in paths if self.busy(p)}
        todo = [p for p in paths if p not in problems]
        outcomes: list[str | None] = []
        batch = blocked_calls.start(_read_files, todo, outcomes)
        batch.add_done_callback(_consume)
        with contextlib.suppress(TimeoutError):
            await blocked_calls.outcome(batch, self.timeout)
        known = list(outcomes)  # the thread's outcomes so far (it may still be adding some)
        problems |= dict(zip(todo, known, strict=False))
        rest = todo[len(known) :]
        if rest:
            stuck, rest = rest[0], rest[1:]
            self._blocked[stuck] = batch
            problems[stuck] = f"no answer reading {stuck} within {self.timeout:g} s"
            found = await asyncio.gather(*(self.check(p) for p in rest))
            problems |= dict(zip(rest, found, strict=True))
        return problems

    def _blocked_for(self, path: str) -> str:
        return f"a read of {path} has been blocked for more than {self.timeout:g} s"


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
