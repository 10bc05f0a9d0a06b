"""The VolumeGroup metadata lock in etcd: held as long as its holder needs it, waited for
as long as `lock_timeout` says (not cut short by the store's request timeout)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from controller.runtime.etcd_lock import LockTimeout
from controller.runtime.store import Store
from reconcilers.lvm_lock import LvmSettings, metadata_lock

SETTINGS = LvmSettings(lock_ttl=2, lock_timeout=60)


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    # A request timeout well below the time the waiter below must wait.
    async with Store(etcd_endpoints, prefix=key_prefix, timeout=1.0) as store:
        yield store


async def test_a_slow_holder_keeps_the_lock_and_the_waiter_gets_it_after_release(
    store: Store,
) -> None:
    order: list[str] = []

    async def take() -> None:
        async with metadata_lock(store, "vg_cluster", SETTINGS):
            order.append("waiter")

    async with metadata_lock(store, "vg_cluster", SETTINGS):
        waiter = asyncio.create_task(take())
        # A slow metadata change: three lease TTLs, and longer than a store request may take.
        await asyncio.sleep(3 * SETTINGS.lock_ttl)
        assert not waiter.done(), "the lock was lost while held, or the wait was cut short"
        order.append("holder")
    await asyncio.wait_for(waiter, 60)
    assert order == ["holder", "waiter"]


async def test_a_lock_taken_for_too_long_is_a_retryable_timeout(store: Store) -> None:
    impatient = LvmSettings(lock_ttl=2, lock_timeout=1)
    async with metadata_lock(store, "vg_cluster", SETTINGS):
        with pytest.raises(LockTimeout, match="metadata lock of VG vg_cluster stayed taken"):
            async with metadata_lock(store, "vg_cluster", impatient):
                pytest.fail("acquired a lock that is held")
