"""`make demo` end to end: `python -m e2e.demo up` twice (the second run removes the first
cluster), then `down`, which must leave no process, namespace, link, loop device or directory.

Each run uses its own `--run-dir`, so a demo a developer left running is not touched.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from e2e.cluster import DetachedState, RecordedProcess
from e2e.demo import STATE_FILE_NAME
from e2e.hosts import REPO_ROOT

DEMO_TIMEOUT = 400.0
"""The demo aims at under 3 minutes; a loaded 2-core machine gets slack."""


async def demo(run_dir: Path, action: str) -> tuple[int, str]:
    """Run `python -m e2e.demo ACTION`; its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "e2e.demo", action, "--run-dir", str(run_dir),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), DEMO_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace")


@pytest.fixture
async def run_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """The demo's state directory; whatever a failed test left up is removed."""
    directory = tmp_path / "demo"
    try:
        yield directory
    finally:
        if (directory / STATE_FILE_NAME).exists():
            await demo(directory, "down")


def is_alive(process: RecordedProcess) -> bool:
    """The recorded process still exists (same PID and start time) and is not a zombie."""
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == process.start_time and fields[0] != "Z"


def leftovers(state: DetachedState) -> list[str]:
    found = [f"process {p.what} ({p.pid})" for p in state.processes if is_alive(p)]
    existing = netns.listnetns()
    found += [f"netns {name}" for name in state.network_namespaces if name in existing]
    with IPRoute() as ipr:
        found += [f"link {name}" for name in state.links if ipr.link_lookup(ifname=name)]
    for device in state.loop_devices:
        backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file")
        if backing.exists() and any(d in backing.read_text() for d in state.directories):
            found.append(f"loop device {device}")
    found += [f"directory {d}" for d in state.directories if os.path.exists(d)]
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_demo_runs_end_to_end_reruns_and_down_removes_everything(run_dir: Path) -> None:
    status, output = await demo(run_dir, "up")
    assert status == 0, output
    for milestone in (
        "vmstore   storage",  # the IscsiTarget is listed
        "BondingUnsupported",
        "vm1 migrated to host",
        "without a gap",
        "NodeFenced",
        "Every VM runs again",
        "The cluster keeps running",
    ):
        assert milestone in output, f"{milestone!r} missing from the demo's output:\n{output}"
    first = DetachedState.load(run_dir / STATE_FILE_NAME)
    assert any(is_alive(p) for p in first.processes), "the cluster should outlive `up`"

    status, output = await demo(run_dir, "up")
    assert status == 0, output
    assert "A previous demo is still up: removing it first" in output
    assert await asyncio.to_thread(leftovers, first) == []
    second = DetachedState.load(run_dir / STATE_FILE_NAME)

    status, output = await demo(run_dir, "down")
    assert status == 0, output
    assert await asyncio.to_thread(leftovers, second) == []
    assert not await asyncio.to_thread(run_dir.exists)
    status, output = await demo(run_dir, "down")
    assert (status, output.strip()) == (0, "No demo cluster is up.")
