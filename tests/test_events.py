"""The event recorder against a real etcd: aggregation, lease-bound expiry, errors swallowed."""

from __future__ import annotations

import asyncio

import pytest

from controller.runtime.events import EventRecorder, event_name
from controller.runtime.store import Store
from crds import Event, ObjectMeta, VirtualMachine
from crds.event import ObjectReference
from crds.virtualmachine import VirtualMachineSpec
from e2e.harness.etcd import free_port

DEADLINE = 30.0


def vm(name: str) -> VirtualMachine:
    return VirtualMachine(metadata=ObjectMeta(name=name), spec=VirtualMachineSpec(memory_mib=64))


async def events(store: Store) -> list[Event]:
    objects, _ = await store.list_objects("Event")
    return [event for event in objects if isinstance(event, Event)]


async def test_the_same_event_twice_is_one_event_with_count_two(store: Store) -> None:
    web = await store.create(vm("web"))
    recorder = EventRecorder(store, "kvmctl-controller", node="host1")
    await recorder.record(web, "Warning", "StartFailed", "no node has room for %d MiB", 64)
    await recorder.record(web, "Warning", "StartFailed", "no node has room for %d MiB", 128)
    [event] = await events(store)
    assert event.spec.count == 2
    assert event.spec.message == "no node has room for 128 MiB"
    assert event.spec.first_timestamp <= event.spec.last_timestamp
    assert event.spec.involved_object == ObjectReference(
        kind="VirtualMachine", name="web", uid=web.metadata.uid
    )
    assert (event.spec.source.component, event.spec.source.node) == ("kvmctl-controller", "host1")
    assert event.metadata.name.startswith("web-")


async def test_different_reasons_types_and_objects_are_different_events(store: Store) -> None:
    recorder = EventRecorder(store, "agent")
    web, db = vm("web"), vm("db")
    await recorder.record(web, "Normal", "Started", "started on host1")
    await recorder.record(web, "Normal", "Stopped", "stopped")
    await recorder.record(web, "Warning", "Started", "started on host1")
    await recorder.record(db, "Normal", "Started", "started on host1")
    await recorder.record(ObjectReference(kind="ClusterNode", name="web"), "Normal", "Started", "x")
    assert len(await events(store)) == 5


async def test_concurrent_repeats_are_all_counted(store: Store) -> None:
    recorder = EventRecorder(store, "agent")
    web = vm("web")
    await asyncio.gather(*(recorder.record(web, "Normal", "Heartbeat", "beat") for _ in range(8)))
    [event] = await events(store)
    assert event.spec.count == 8


async def test_events_recorded_within_the_lease_window_share_one_lease(store: Store) -> None:
    recorder = EventRecorder(store, "agent", ttl=2)
    recorder.lease_window = 60  # both records fall in it, however slow the machine
    await recorder.record(vm("a"), "Normal", "Started", "started")
    await recorder.record(vm("b"), "Normal", "Started", "started")
    stored = await events(store)
    assert len(stored) == 2
    kvs = [await store.client.get(store.key("Event", event.metadata.name)) for event in stored]
    leases = {kv.lease for kv in kvs}
    assert len(leases) == 1 and 0 not in leases, "both events share one lease"
    info = await store.client.get_lease_info(leases.pop())
    assert recorder.ttl <= info.grantedTTL <= recorder.ttl + recorder.lease_window


async def test_an_event_expires_with_its_lease(store: Store) -> None:
    recorder = EventRecorder(store, "agent", ttl=2)
    _, revision = await store.list_objects("Event")

    async def added_then_deleted() -> list[str]:
        seen: list[str] = []
        async for change in store.watch("Event", revision + 1, reconnect_delay=0.1):
            seen.append(change.type)
            if change.type == "DELETED":
                return seen
        return seen

    watcher = asyncio.create_task(added_then_deleted())
    await recorder.record(vm("a"), "Normal", "Started", "started")
    # Watched rather than read: the 3 s lease may expire before a read on a loaded machine.
    assert await asyncio.wait_for(watcher, DEADLINE) == ["ADDED", "DELETED"]


async def test_a_repeat_after_the_lease_window_moves_to_a_fresh_lease(store: Store) -> None:
    recorder = EventRecorder(store, "agent", ttl=30)
    recorder.lease_window = 0  # every record grants a lease
    web = vm("web")
    await recorder.record(web, "Normal", "Started", "started")
    key = store.key("Event", (await events(store))[0].metadata.name)
    first = (await store.client.get(key)).lease
    await recorder.record(web, "Normal", "Started", "started")
    second = (await store.client.get(key)).lease
    assert second not in (0, first)
    [event] = await events(store)
    assert event.spec.count == 2


async def test_a_recorder_whose_lease_was_revoked_grants_another(store: Store) -> None:
    recorder = EventRecorder(store, "agent")
    await recorder.record(vm("a"), "Normal", "Started", "started")
    assert recorder._lease_id is not None
    await store.client.revoke_lease(recorder._lease_id)  # also deletes the event
    await recorder.record(vm("a"), "Normal", "Started", "started")
    [event] = await events(store)
    assert event.spec.count == 1


async def test_store_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = Store([f"127.0.0.1:{free_port()}"], timeout=0.5)
    try:
        recorder = EventRecorder(unreachable, "agent")
        await recorder.record(vm("web"), "Warning", "StartFailed", "no room")
    finally:
        await unreachable.close()
    assert "could not record event StartFailed on VirtualMachine web" in caplog.text


async def test_reasons_must_be_camel_case(store: Store) -> None:
    recorder = EventRecorder(store, "agent")
    with pytest.raises(ValueError, match="CamelCase"):
        await recorder.record(vm("web"), "Normal", "not camel", "x")
    assert await events(store) == []


def test_event_names_fit_a_dns_label_whatever_the_object_name() -> None:
    reference = ObjectReference(kind="VirtualMachine", name="a" * 62 + "b")
    name = event_name(reference, "Normal", "Started", "started")
    assert len(name) <= 63
    ObjectMeta(name=name)  # validates as an object name
    other = event_name(reference, "Normal", "Started", "started on %s")
    assert other != name
