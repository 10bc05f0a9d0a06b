"""A PrefixCache (the raw keys' watch: heartbeats, requests, reports) across an etcd outage: it
retries its relist while etcd is gone and comes back to the current keys."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.runtime import layout_keys
from controller.runtime.prefix_cache import PrefixCache
from controller.runtime.store import Store, StoreError
from controller.runtime.tasks import cancel_and_wait
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually

PREFIX = "/prefix-cache"


async def test_the_cache_relists_after_etcd_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="controller.runtime.prefix_cache")
    with EtcdCluster(size=1) as cluster:
        store = Store(cluster.endpoints, prefix=PREFIX, timeout=2.0)
        await store.connect()
        changes: list[tuple[str, bytes | None]] = []
        cache = PrefixCache(store, layout_keys.HEARTBEATS, lambda *change: changes.append(change))
        task = asyncio.create_task(cache.run())
        try:
            await store.keys.put(store.raw_key(layout_keys.heartbeat("a")), b"1")
            await eventually(lambda: cache.values.get("a") == b"1", "a listed or watched")

            member = cluster.members[0]
            await asyncio.to_thread(member.stop)

            def retried() -> bool:
                return sum(r.getMessage().startswith("listing ") for r in caplog.records) >= 2

            await eventually(retried, "the relist retried while etcd is down", timeout=60)
            await asyncio.to_thread(member.start, "existing")
            await asyncio.to_thread(member.wait_healthy)

            async def write_after_outage() -> bool:
                await store.keys.put(store.raw_key(layout_keys.heartbeat("b")), b"2")
                return await store.keys.delete(store.raw_key(layout_keys.heartbeat("a")))

            await eventually(write_after_outage, "etcd answers again", retry_on=(StoreError,))
            await eventually(lambda: cache.values == {"b": b"2"}, "the keys after the outage")
            assert ("b", b"2") in changes and ("a", None) in changes
        finally:
            await cancel_and_wait([task])
            await store.close()
