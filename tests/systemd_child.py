"""A daemon stand-in for test_systemd: the real `Service` (sd_notify, watchdog) on an event loop.

Usage: systemd_child.py RELEASE_FILE

SIGUSR1 blocks the event loop (as a blocking call in a coroutine would) until RELEASE_FILE
exists; it prints `blocked` first and `unblocked` after. SIGTERM ends it (STOPPING=1).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from controller.runtime.systemd import Service


def block(release: Path) -> None:
    print("blocked", flush=True)
    while not release.exists():
        time.sleep(0.01)  # deliberately blocking: the loop does not turn
    print("unblocked", flush=True)


async def main(release: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, block, release)
    async with Service() as service:
        service.ready("serving")
        print("running", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
