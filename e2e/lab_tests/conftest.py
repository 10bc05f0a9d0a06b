"""Tests that need a full kernel (bonding, device-mapper, ...). They run inside the kernel lab
(`e2e/test_kernellab.py` boots it once for this whole folder); on the host they are not even
collected (and skipped if named explicitly), since only the lab's init sets KVMCTL_KERNEL_LAB=1.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from e2e.harness.iscsi_lab import (  # the iSCSI tests' fixtures  # noqa: F401
    backing_store,
    initiator_name_file,
    iscsid,
    iscsid_log,
    store,
    tgtd,
)
from reconcilers.drivers.netlink import Netlink

IN_LAB = os.environ.get("KVMCTL_KERNEL_LAB") == "1"
if not IN_LAB:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _only_in_the_lab() -> None:
    """Files named explicitly on the host are still collected: skip them there."""
    if not IN_LAB:
        pytest.skip("runs in the kernel lab: python -m e2e.kernellab.run -- pytest e2e/lab_tests")


@pytest.fixture
async def nl(netns: str) -> AsyncIterator[Netlink]:
    async with Netlink(netns) as driver:
        await driver.set_up("lo")
        yield driver
