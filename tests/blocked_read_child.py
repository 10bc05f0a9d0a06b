"""A daemon stand-in for test_storage_paths: the agent's file check blocked on a read, then
SIGTERM, as an agent whose datastore stalled is stopped.

Usage: blocked_read_child.py FIFO

Checks FIFO (opening a FIFO without a writer blocks, like a read on a stalled mount) with the
real `FileCheck`, prints its answer once the check gave up (the read still blocked in its
thread), then runs until SIGTERM and returns from `asyncio.run` like `kvmctl agent`.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from reconcilers.drivers.storage_paths import FileCheck


async def main(fifo: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    files = FileCheck(timeout=0.2)
    print(await files.check(fifo), flush=True)
    assert files.busy(fifo), "the read should still be blocked"
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
