"""The daemons' start: `connect_when_reachable` waits for an etcd that is down (a host booting
before its etcd member has joined) and connects once it answers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually


async def test_a_daemon_start_waits_for_etcd_and_connects_once_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.runtime.store_client")
    with EtcdCluster(size=1) as cluster:
        member = cluster.members[0]
        await asyncio.to_thread(member.stop)
        store = Store(cluster.endpoints, "/patient")
        connecting = asyncio.create_task(store.connect_when_reachable(retry=0.2))
        try:
            await eventually(
                lambda: any("unreachable" in r.getMessage() for r in caplog.records),
                "the wait for etcd logged",
            )
            assert not connecting.done()
            await asyncio.to_thread(cluster.restart, 0)
            async with asyncio.timeout(60):
                await connecting
            assert await store.revision() > 0
        finally:
            connecting.cancel()
            await asyncio.wait({connecting})
            await store.close()
