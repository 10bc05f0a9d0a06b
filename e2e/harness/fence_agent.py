"""Run fence_kvmctl as Pacemaker's stonithd does: a separate process, `key=value` lines on stdin."""

from __future__ import annotations

import asyncio
import sys

from e2e.harness.hosts import REPO_ROOT


async def run_fence_kvmctl(values: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, stdout); its stderr is printed when it fails. Killed after `timeout`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli.fence_kvmctl",
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdin = "".join(f"{key}={value}\n" for key, value in values.items()).encode()
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    if process.returncode == 1:
        print(err.decode(), file=sys.stderr)
    return process.returncode, out.decode()
