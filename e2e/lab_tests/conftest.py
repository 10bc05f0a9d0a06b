"""Tests that need a full kernel (bonding, device-mapper, ...). They run inside the kernel lab
(`e2e/test_kernellab.py` boots it once for this whole folder); on the host they are not even
collected (and skipped if named explicitly), since only the lab's init sets KVMCTL_KERNEL_LAB=1.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from reconcilers.drivers.netlink import Netlink

IN_LAB = os.environ.get("KVMCTL_KERNEL_LAB") == "1"
if not IN_LAB:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _only_in_the_lab() -> None:
    """Files named explicitly on the host are still collected: skip them there."""
    if not IN_LAB:
        pytest.skip("runs in the kernel lab: python -m e2e.kernellab.run -- pytest e2e/lab_tests")


async def _ip(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, f"ip {' '.join(args)}: {output.decode()}"


@pytest.fixture
async def netns() -> AsyncIterator[str]:
    """A fresh network namespace, deleted afterwards with everything in it."""
    name = f"kvmctl-lab-{uuid.uuid4().hex[:8]}"
    await _ip("netns", "add", name)
    try:
        yield name
    finally:
        await _ip("netns", "del", name)


@pytest.fixture
async def nl(netns: str) -> AsyncIterator[Netlink]:
    async with Netlink(netns) as driver:
        await driver.set_up("lo")
        yield driver
