"""Watches of one etcd client do not take each other's replies.

aetcd multiplexes every watch of a client on one gRPC stream and gives etcd's "created" reply to
whichever watch is being created when it arrives. A create that timed out on a slow etcd then
had its late reply given to the next watch being created (another prefix's), whose own reply was
cancelled: that watch received the other prefix's events and never its own. In the 50-host rack
one agent's VirtualMachine cache stopped at one revision for good (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import signal

import aetcd
import pytest

from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster

DEADLINE = 30.0


async def first_key(watch: aetcd.rtypes.Watch) -> bytes:
    async for event in watch:
        return bytes(event.kv.key)
    raise AssertionError("the watch ended without an event")


async def test_a_watch_created_after_another_timed_out_gets_its_own_events(
    etcd_private: EtcdCluster,
) -> None:
    etcd = etcd_private.members[0].process
    assert etcd is not None
    async with Store(etcd_private.endpoints, prefix="/kvmctl", timeout=1.0) as store:
        client = store.client
        warm = await client.watch_prefix(b"/kvmctl/warm/")  # the client's streams are up
        await warm.cancel()
        etcd.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(aetcd.WatchTimeoutError):
                await client.watch_prefix(b"/kvmctl/a/")  # its create waits in the stopped etcd
            creating_b = asyncio.create_task(client.watch_prefix(b"/kvmctl/b/"))
            for _ in range(50):  # let b's create be sent: both now wait for etcd
                await asyncio.sleep(0)
        finally:
            etcd.send_signal(signal.SIGCONT)
        watch_b = await asyncio.wait_for(creating_b, DEADLINE)
        try:
            await client.put(b"/kvmctl/a/1", b"for a")
            await client.put(b"/kvmctl/b/1", b"for b")
            assert await asyncio.wait_for(first_key(watch_b), DEADLINE) == b"/kvmctl/b/1"
        finally:
            await watch_b.cancel()
