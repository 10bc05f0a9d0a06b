"""The test harness's stand-in for /dev/watchdog (this machine has no watchdog device).

It runs outside the simulated host, creates a FIFO the host's agent opens and writes to exactly
as it would to /dev/watchdog, and behaves like a Linux watchdog driver without `nowayout`:

- disarmed until the first byte arrives; every byte feeds it;
- armed and not fed for `--timeout` seconds: SIGKILL the host's namespace init (the whole host
  dies, like a hardware reset), print `fired`, exit 0;
- closed by the writer after a write containing 'V' (the magic close): disarmed again;
  closed without it: stays armed, so a crashed agent still gets its host killed;
- the target already gone: exit 1 without doing anything.

    python -m e2e.harness.watchdog --fifo PATH --pid PID --timeout SECONDS

The target is held by pidfd, so a recycled PID can never be killed by mistake.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time
from pathlib import Path

MAGIC_CLOSE = b"V"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} watchdog: {message}", flush=True)


def open_fifo(fifo: Path) -> int:
    """Open the FIFO for reading without waiting for a writer."""
    return os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)


def run(fifo: Path, target_pid: int, timeout: float) -> int:
    target = os.pidfd_open(target_pid)
    if not fifo.exists():
        os.mkfifo(fifo, 0o600)
    reader = open_fifo(fifo)
    poller = select.poll()
    poller.register(target, select.POLLIN)  # readable once the target has exited
    poller.register(reader, select.POLLIN)
    log(f"watching pid {target_pid} through {fifo}, timeout {timeout} s")
    log("state=disarmed until the first byte")
    deadline: float | None = None  # armed while set
    magic_seen = False
    while True:
        wait_ms = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        events = dict(poller.poll(wait_ms))
        if target in events:
            log(f"pid {target_pid} is gone; nothing to do")
            return 1
        if deadline is not None and time.monotonic() >= deadline:
            signal.pidfd_send_signal(target, signal.SIGKILL)
            log(f"fired: no byte for {timeout} s, killed pid {target_pid}")
            return 0
        if reader not in events:
            continue
        data = os.read(reader, 4096)
        if data:
            if deadline is None:
                log("state=armed")
            deadline = time.monotonic() + timeout
            magic_seen = MAGIC_CLOSE in data
            continue
        # End of file: the writer closed. Reopen, or poll would report the hang-up forever.
        poller.unregister(reader)
        os.close(reader)
        reader = open_fifo(fifo)
        poller.register(reader, select.POLLIN)
        if deadline is not None and magic_seen:
            deadline = None
            log("state=disarmed by magic close")
        elif deadline is not None:
            log("closed without the magic character: state=armed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.harness.watchdog", description=__doc__)
    parser.add_argument("--fifo", type=Path, required=True, help="FIFO the agent writes to")
    parser.add_argument("--pid", type=int, required=True, help="namespace init to kill")
    parser.add_argument("--timeout", type=float, required=True, help="seconds without a byte")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    try:
        return run(args.fifo, args.pid, args.timeout)
    except ProcessLookupError:
        print(f"error: --pid {args.pid}: no such process", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
