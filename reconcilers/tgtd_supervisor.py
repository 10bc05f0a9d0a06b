"""Start tgtd when no tgtd answers on the node's control port (the agent calls this).

A tgtd that is already running (started by systemd, or by a previous agent) is left alone: its
targets carry live sessions. One that this supervisor started is stopped only by `stop()`, by the
PID it started, never by name; `stop()` also removes the control socket files tgtd leaves behind.

    supervisor = TgtdSupervisor(portal="10.0.1.1:3260")
    await supervisor.ensure_running()
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
from pathlib import Path

from reconcilers.drivers.tgt import TgtAdm, TgtError

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
STOP_TIMEOUT = 10.0
CONTROL_SOCKET_DIR = Path("/run/tgtd")
"""Where tgtd puts its control socket `socket.N` and lock file `socket.N.lock` (N: the port)."""


class TgtdStartError(RuntimeError):
    """tgtd did not come up."""


class TgtdSupervisor:
    """Makes sure a tgtd serves `portal` on `control_port` (None: tgtd's default port).

    tgtd refuses control ports above 32767. Its log goes to the caller's stderr.
    """

    def __init__(self, portal: str, control_port: int | None = None) -> None:
        self.portal = portal
        self.control_port = control_port
        self.adm = TgtAdm(control_port)
        self.process: asyncio.subprocess.Process | None = None

    async def ensure_running(self) -> bool:
        """Start tgtd unless one answers; True if this call started it."""
        if await self.adm.is_running():
            return False
        args = ["tgtd", "-f"]
        if self.control_port is not None:
            args += ["-C", str(self.control_port)]
        args += ["--iscsi", f"portal={self.portal}"]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        except FileNotFoundError:
            raise TgtdStartError("tgtd is not installed (Debian package tgt)") from None
        log.info("started tgtd (pid %d) on portal %s", self.process.pid, self.portal)
        await self._wait_ready()
        return True

    async def _wait_ready(self) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while not await self.adm.is_running():
            if self.process.returncode is not None:
                raise TgtdStartError(
                    f"tgtd exited with status {self.process.returncode} (its log is on stderr)"
                )
            if loop.time() > deadline:
                await self.stop()
                raise TgtdStartError(f"tgtd did not answer within {READY_TIMEOUT} s")
            await asyncio.sleep(POLL_INTERVAL)

    async def stop(self) -> None:
        """Stop the tgtd this supervisor started (targets are dropped with it)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            try:
                for target in await self.adm.show():
                    await self.adm.delete_target(target.tid, force=True)
                await self.adm.stop_daemon()
            except TgtError as error:
                log.warning("tgtd (pid %d) did not stop on request: %s", process.pid, error)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.to_thread(remove_stale_control_socket, self.control_port)


def remove_stale_control_socket(control_port: int | None) -> None:
    """Remove the control socket and lock file an exited tgtd left behind (tgtd never does).

    tgtd holds a `lockf` lock on the lock file for as long as it runs: files whose lock cannot
    be taken belong to a running tgtd (perhaps another one on the same port) and are kept.
    """
    socket = CONTROL_SOCKET_DIR / f"socket.{control_port or 0}"
    lock_path = socket.with_name(f"{socket.name}.lock")
    try:
        lock_file = open(lock_path, "r+b")  # noqa: SIM115 - closed below, after the unlink
    except FileNotFoundError:
        return
    with lock_file:
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        socket.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
