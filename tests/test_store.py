"""The store against a real etcd: CAS, generation, status, finalizers, watch."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from controller.runtime.store import (
    AlreadyExists,
    Compacted,
    Conflict,
    NotFound,
    Store,
    StoreError,
    Unavailable,
    WatchEvent,
)
from crds import ClusterNode, VirtualMachine, parse_object
from crds.meta import Resource
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually


def make_vm(name: str = "vm1", memory: int = 128) -> VirtualMachine:
    obj = parse_object(
        {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"memoryMiB": memory},
        }
    )
    assert isinstance(obj, VirtualMachine)
    return obj


async def test_create_get_update_delete(store: Store) -> None:
    created = await store.create(make_vm())
    assert created.metadata.generation == 1 and created.metadata.uid
    with pytest.raises(AlreadyExists):
        await store.create(make_vm())
    fetched = await store.get("VirtualMachine", "vm1")
    assert fetched.metadata.resource_version == created.metadata.resource_version
    fetched.spec.vcpus = 2
    updated = await store.update(fetched)
    assert updated.metadata.generation == 2
    assert int(updated.metadata.resource_version or 0) > int(created.metadata.resource_version or 0)
    assert await store.delete("VirtualMachine", "vm1") is None
    with pytest.raises(NotFound):
        await store.get("VirtualMachine", "vm1")


async def test_reads_by_model_are_typed_by_it(store: Store) -> None:
    await store.create(make_vm("web"))
    # Annotated: mypy refuses these lines if the reads by model were not typed by it.
    vm: VirtualMachine = await store.get(VirtualMachine, "web")
    missing: ClusterNode | None = await store.try_get(ClusterNode, "web")
    listed: list[VirtualMachine] = (await store.list_objects(VirtualMachine))[0]
    assert vm.spec.memory_mib == 128 and missing is None
    assert [obj.metadata.name for obj in listed] == ["web"]
    assert await store.get("VirtualMachine", "web") == vm  # by name, as before
    with pytest.raises(NotFound, match="VirtualMachine 'db' not found"):
        await store.get(VirtualMachine, "db")
    with pytest.raises(StoreError, match="Resource is not a kind's model"):
        await store.get(Resource, "web")


async def test_two_writers_one_conflicts(store: Store) -> None:
    await store.create(make_vm())
    first = await store.get("VirtualMachine", "vm1")
    second = await store.get("VirtualMachine", "vm1")
    first.spec.vcpus = 2
    second.spec.vcpus = 4
    await store.update(first)
    with pytest.raises(Conflict):
        await store.update(second)
    assert (await store.get("VirtualMachine", "vm1")).spec.vcpus == 2


async def test_status_and_spec_writers_do_not_overwrite_each_other(store: Store) -> None:
    await store.create(make_vm())
    user = await store.get("VirtualMachine", "vm1")

    def seen_on_host1(obj: VirtualMachine) -> None:
        obj.status.node = "host1"

    await store.patch_status("VirtualMachine", "vm1", seen_on_host1)
    # The user's copy is now stale: the update conflicts, and re-reading keeps the status.
    user.spec.vcpus = 3
    with pytest.raises(Conflict):
        await store.update(user)
    fresh = await store.get("VirtualMachine", "vm1")
    fresh.spec.vcpus = 3
    fresh.status.node = "somewhere-else"  # ignored: update() does not write status
    stored = await store.update(fresh)
    assert stored.status.node == "host1" and stored.spec.vcpus == 3
    status_only = await store.get("VirtualMachine", "vm1")
    status_only.spec.vcpus = 99  # ignored: update_status() does not write spec
    status_only.status.state = "Running"
    after = await store.update_status(status_only)
    assert after.spec.vcpus == 3 and after.status.state == "Running"
    assert after.metadata.generation == 2  # status writes never bump generation


async def test_finalizers_hold_deletion(store: Store) -> None:
    await store.create(make_vm())
    await store.add_finalizer("VirtualMachine", "vm1", "kvmctl.io/domain")
    marked = await store.delete("VirtualMachine", "vm1")
    assert marked is not None and marked.metadata.deletion_timestamp is not None
    assert (await store.get("VirtualMachine", "vm1")).metadata.deletion_timestamp is not None
    await store.remove_finalizer("VirtualMachine", "vm1", "kvmctl.io/domain")
    assert await store.try_get("VirtualMachine", "vm1") is None


async def test_guarded_write_fails_when_guard_does_not_hold(store: Store) -> None:
    await store.create(make_vm())
    guard_key = f"{store.prefix}/guard".encode()
    await store.client.put(guard_key, b"token")
    reply = await store.client.get(guard_key)
    txn = store.client.transactions
    stale_guard = [txn.create(guard_key) == reply.create_revision + 1000]

    def mark(obj: VirtualMachine) -> None:
        obj.status.node = "host9"

    with pytest.raises(Conflict, match="guard"):
        await store.patch_status("VirtualMachine", "vm1", mark, guard=stale_guard)
    assert (await store.get("VirtualMachine", "vm1")).status.node is None
    good_guard = [txn.create(guard_key) == reply.create_revision]
    await store.patch_status("VirtualMachine", "vm1", mark, guard=good_guard)
    assert (await store.get("VirtualMachine", "vm1")).status.node == "host9"


async def test_key_cannot_escape_the_prefix(store: Store) -> None:
    for name in ("../etc", "a/b", "", "x" * 300, "nul\x00"):
        with pytest.raises(ValueError):
            store.key("VirtualMachine", name)
    with pytest.raises(StoreError):
        store.key("../Secret", "a")


async def _collect(store: Store, start: int, count: int) -> list[WatchEvent]:
    events: list[WatchEvent] = []
    async for event in store.watch("VirtualMachine", start, reconnect_delay=0.1):
        events.append(event)
        if len(events) == count:
            break
    return events


async def test_watch_sees_changes_in_order(store: Store) -> None:
    _, revision = await store.list_objects("VirtualMachine")
    watcher = asyncio.create_task(_collect(store, revision + 1, 3))
    created = await store.create(make_vm())
    created.spec.vcpus = 2
    await store.update(created)
    await store.delete("VirtualMachine", "vm1")
    events = await asyncio.wait_for(watcher, 30)
    assert [e.type for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[2].object.metadata.name == "vm1"


async def create_once_reconnected(store: Store, obj: VirtualMachine) -> None:
    """Create `obj`, retrying while the client reconnects on its own.

    A create that failed as Unavailable may still have reached etcd (its reply was lost), so a
    retry accepts AlreadyExists; the first attempt does not.
    """
    attempts = 0

    async def created() -> bool:
        nonlocal attempts
        attempts += 1
        try:
            await store.create(obj)
        except Unavailable:
            return False
        except AlreadyExists:
            if attempts == 1:
                raise
        return True

    await eventually(created, f"{obj.metadata.name} created once the store reconnected")


async def test_watch_resumes_across_an_etcd_restart(etcd_private: EtcdCluster) -> None:
    async with Store(etcd_private.endpoints, prefix="/w") as store:
        _, revision = await store.list_objects("VirtualMachine")
        watcher = asyncio.create_task(_collect(store, revision + 1, 3))
        await store.create(make_vm("before"))
        await asyncio.to_thread(etcd_private.restart)
        await create_once_reconnected(store, make_vm("after"))
        await create_once_reconnected(store, make_vm("after2"))
        events = await asyncio.wait_for(watcher, 60)
        assert [e.object.metadata.name for e in events] == ["before", "after", "after2"]


async def test_watch_backs_off_while_etcd_is_down_and_resumes_after(
    etcd_private: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.runtime.store_watch")
    member = etcd_private.members[0]
    async with Store(etcd_private.endpoints, prefix="/w") as store:
        _, revision = await store.list_objects("VirtualMachine")
        watcher = asyncio.create_task(_collect(store, revision + 1, 2))
        await store.create(make_vm("before"))
        await asyncio.to_thread(member.stop)
        try:

            def retries() -> int:
                return sum("resuming failed" in r.getMessage() for r in caplog.records)

            await eventually(lambda: retries() >= 3, "several failed attempts to resume")
            assert not watcher.done()
        finally:
            await asyncio.to_thread(member.start, "existing")
            await asyncio.to_thread(member.wait_healthy)
        await create_once_reconnected(store, make_vm("after"))
        events = await asyncio.wait_for(watcher, 60)
        assert [e.object.metadata.name for e in events] == ["before", "after"]


async def test_watch_from_a_compacted_revision_asks_for_a_relist(etcd_private: EtcdCluster) -> None:
    async with Store(etcd_private.endpoints) as store:
        await _compacted_watch_raises(store)


async def _compacted_watch_raises(store: Store) -> None:
    first = await store.create(make_vm())
    for vcpus in (2, 3, 4):
        current = await store.get("VirtualMachine", "vm1")
        current.spec.vcpus = vcpus
        await store.update(current)
    await store.compact(await store.revision())
    with pytest.raises(Compacted):
        await _collect(store, int(first.metadata.resource_version or 0), 1)


async def test_unreachable_etcd_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="unreachable"):
        async with Store(["127.0.0.1:9"], timeout=2):
            pass
    assert time.monotonic() - started < 30  # a readable error, not a hang


async def test_several_endpoints_fail_over(etcd_session: EtcdCluster, key_prefix: str) -> None:
    endpoints = ["127.0.0.1:9", *etcd_session.endpoints]
    async with Store(endpoints, prefix=key_prefix) as store:
        await store.create(make_vm())
        assert (await store.get("VirtualMachine", "vm1")).metadata.generation == 1


async def test_a_corrupt_value_is_skipped_not_fatal(store: Store) -> None:
    await store.create(make_vm("good"))
    _, revision = await store.list_objects("VirtualMachine")
    watcher = asyncio.create_task(_collect(store, revision + 1, 1))
    await store.client.put(store.kind_prefix("VirtualMachine") + b"bad", b"{not json")
    await store.create(make_vm("after"))
    events = await asyncio.wait_for(watcher, 30)
    assert [e.object.metadata.name for e in events] == ["after"]
    objects, _ = await store.list_objects("VirtualMachine")
    assert sorted(o.metadata.name for o in objects) == ["after", "good"]
