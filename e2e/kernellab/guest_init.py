"""Stage 2 of the kernel lab: PID 1 inside the guest, on the overlay of the host's root.

Runs under `python3 -I -S` (standard library only). Reads the job the host wrote into the shared
directory, runs it with output to that directory, records its exit status there and makes QEMU
exit through the isa-debug-exit port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SHARE = Path("/run/kernellab")
DEBUG_EXIT_PORT = 0xF4


def run_job() -> int:
    job = json.loads((SHARE / "job.json").read_text())
    socket.sethostname("kernellab")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    with open(SHARE / "output.log", "wb") as output:
        completed = subprocess.run(
            job["argv"],
            cwd=job["cwd"],
            env=job["env"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
        )
    return completed.returncode


def main() -> None:
    try:
        returncode = run_job()
    except Exception as error:  # PID 1 must report, whatever happened
        print(f"kernellab stage 2: {error!r}", file=sys.stderr, flush=True)
        returncode = 125
    (SHARE / "returncode").write_text(f"{returncode}\n")
    os.sync()
    port = os.open("/dev/port", os.O_WRONLY)
    os.pwrite(port, bytes([returncode & 0x7F]), DEBUG_EXIT_PORT)


if __name__ == "__main__":
    main()
