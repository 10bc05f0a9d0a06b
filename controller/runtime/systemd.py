"""The daemons' side of systemd's service protocol: sd_notify and the service watchdog.

A unit with `Type=notify` passes `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace);
the daemon sends `READY=1` once it serves, `WATCHDOG=1` at least every `$WATCHDOG_USEC / 2`
(when the unit has `WatchdogSec=`) and `STOPPING=1` on the way out. Outside systemd (no
`$NOTIFY_SOCKET`) every call here does nothing.

`Service` feeds the watchdog from a task on the asyncio event loop, so a loop that stops
turning (a blocking call, a busy coroutine) stops the pings and systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to `$NOTIFY_SOCKET`; does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        target = environ.get("NOTIFY_SOCKET", "")
        if target.startswith("@"):
            target = "\0" + target[1:]  # abstract namespace
        self._address = target
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *assignments: str) -> None:
        """Send `assignments` ("READY=1", "STATUS=...") as one datagram; failures are logged."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as error:
            log.warning("sd_notify %s: %s", ", ".join(assignments), error)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None if not asked.

    `$WATCHDOG_PID`, when set, must be this process (systemd sets it for the main process).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Service:
    """One daemon's sd_notify state: `ready()` once serving; watchdog pings while running.

    Use as `async with Service() as service:`; leaving the block sends STOPPING=1.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.notifier = Notifier(environ)
        self.interval = watchdog_interval(environ)
        self._tasks: list[asyncio.Task[None]] = []

    def ready(self, status: str = "") -> None:
        """Tell systemd the daemon is up (`systemctl start` returns); `status` is shown too."""
        self.notifier.notify("READY=1", *([f"STATUS={status}"] if status else []))
        if status:
            log.info("ready: %s", status)

    def ready_when(self, condition: Awaitable[object], status: str = "") -> None:
        """Send READY=1 once `condition` completes (cancelled when the service ends)."""

        async def wait_then_notify() -> None:
            await condition
            self.ready(status)

        self._tasks.append(asyncio.create_task(wait_then_notify(), name="sd_notify ready"))

    async def _feed_watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def __aenter__(self) -> Service:
        if self.notifier.enabled and self.interval is not None:
            feed = self._feed_watchdog(self.interval)
            self._tasks.append(asyncio.create_task(feed, name="systemd watchdog"))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.notifier.notify("STOPPING=1")
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.notifier.close()
