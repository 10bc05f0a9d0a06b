"""The store on a 3-member etcd whose member in use dies (SIGKILL) or hangs (SIGSTOP): reads,
writes, watches and lease keep-alives carry on through the other members, without errors."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually
from tests.support.etcd import three_members
from tests.support.ha import vm_object

SIGNALS = [pytest.param(signal.SIGKILL, id="killed"), pytest.param(signal.SIGSTOP, id="hung")]


cluster = three_members


@pytest.fixture
async def store(cluster: EtcdCluster) -> AsyncIterator[Store]:
    """A store on every member, the first one (the one it uses first) listed first."""
    async with Store(cluster.endpoints, prefix="/failover") as store:
        yield store


def fail_first(cluster: EtcdCluster, sig: signal.Signals) -> None:
    process = cluster.members[0].process
    assert process is not None
    process.send_signal(sig)
    if sig == signal.SIGKILL:
        process.wait()


@pytest.mark.parametrize("sig", SIGNALS)
async def test_reads_then_writes_go_on_through_another_member(
    cluster: EtcdCluster, store: Store, sig: signal.Signals
) -> None:
    await store.create(vm_object("before"))
    fail_first(cluster, sig)
    assert (await store.get("VirtualMachine", "before")).metadata.name == "before"
    await store.create(vm_object("after"))
    names = {vm.metadata.name for vm in (await store.list_objects("VirtualMachine"))[0]}
    assert names == {"before", "after"}


async def test_a_write_right_after_a_kill_goes_to_another_member(
    cluster: EtcdCluster, store: Store
) -> None:
    await store.create(vm_object("before"))
    fail_first(cluster, signal.SIGKILL)
    await store.create(vm_object("after"))
    assert (await store.get("VirtualMachine", "after")).metadata.name == "after"


async def _collect(store: Store, revision: int, names: list[str]) -> None:
    async for event in store.watch("VirtualMachine", revision):
        names.append(event.object.metadata.name)


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_watch_moves_to_another_member(
    cluster: EtcdCluster, store: Store, sig: signal.Signals
) -> None:
    _, revision = await store.list_objects("VirtualMachine")
    names: list[str] = []
    watch = asyncio.create_task(_collect(store, revision + 1, names))
    try:
        await store.create(vm_object("ready"))
        await eventually(lambda: "ready" in names, "the watch sees the first object")
        fail_first(cluster, sig)
        async with Store(cluster.endpoints[1:], prefix="/failover") as writer:
            await writer.create(vm_object("seen"))
        await eventually(lambda: "seen" in names, "the watch sees a write made after the failure")
    finally:
        watch.cancel()
    assert names == ["ready", "seen"]


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_lease_is_kept_alive_through_another_member(
    cluster: EtcdCluster, store: Store, sig: signal.Signals
) -> None:
    lease = await store.call(store.client.lease(30))
    fail_first(cluster, sig)
    reply = await store.call(store.client.refresh_lease(lease.id))
    assert reply.TTL > 0
    info = await store.call(store.client.get_lease_info(lease.id, keys=False))
    assert info.TTL > 0
