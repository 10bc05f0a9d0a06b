"""The key layout by writer against a real etcd: merge rules, CAS across parts, finalizers, events.

Every object is a spec key plus status parts (controller/runtime/layout.py); these tests write
through stores with different writer identities and read the raw keys to check where things went.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from controller.runtime.events import EventRecorder
from controller.runtime.store import Conflict, Store, StoreError, WatchEvent
from crds import ClusterNode, Event, VirtualMachine, parse_object
from crds.meta import now
from crds.virtualmachine import Placement
from e2e.harness.polling import eventually


def vm(name: str = "vm1") -> VirtualMachine:
    obj = parse_object(
        {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"memoryMiB": 64},
        }
    )
    assert isinstance(obj, VirtualMachine)
    return obj


def node(name: str) -> ClusterNode:
    obj = parse_object(
        {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": "ClusterNode",
            "metadata": {"name": name},
            "spec": {"addresses": {"cluster": "10.0.0.1"}},
        }
    )
    assert isinstance(obj, ClusterNode)
    return obj


async def raw(store: Store, relative: str) -> Any:
    kv = await store.client.get(store.raw_key(relative))
    return None if kv is None else json.loads(kv.value)


def place(node_name: str) -> Any:
    def mutate(obj: Any) -> None:
        obj.status.placement = Placement(node=node_name, token=1, since=now())

    return mutate


async def get_vm(store: Store, name: str = "vm1") -> VirtualMachine:
    obj = await store.get("VirtualMachine", name)
    assert isinstance(obj, VirtualMachine)
    return obj


async def test_spec_and_parts_live_in_their_own_keys(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))

    def running(obj: Any) -> None:
        obj.status.state, obj.status.node = "Running", "host1"

    merged = await host1.patch_status("VirtualMachine", "vm1", running)
    spec = await raw(store, "kinds/VirtualMachine/spec/vm1")
    assert "status" not in spec and spec["spec"]["memoryMiB"] == 64
    controller = await raw(store, "kinds/VirtualMachine/status/controller/vm1")
    assert controller["status"]["placement"]["node"] == "host1"
    reported = await raw(store, "kinds/VirtualMachine/status/node.host1/vm1")
    assert reported["status"]["state"] == "Running"
    assert reported["metadata"]["uid"] == spec["metadata"]["uid"]
    assert merged.status.state == "Running" and merged.status.placement is not None
    again = await get_vm(store)
    assert again.status == merged.status
    assert again.metadata.resource_version == merged.metadata.resource_version
    assert [o.status for o in (await store.list_objects("VirtualMachine"))[0]] == [again.status]


async def test_a_node_cannot_decide_controller_fields(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))

    def hijack(obj: Any) -> None:
        obj.status.placement = Placement(node="host2", token=99, since=now())
        obj.status.relocations = 7
        obj.status.message = "reported by host1"

    written = await host1.patch_status("VirtualMachine", "vm1", hijack)
    for seen in (written, await get_vm(store)):
        assert seen.status.placement is not None and seen.status.placement.node == "host1"
        assert seen.status.relocations == 0
        assert seen.status.message == "reported by host1"  # not controller-only: newest wins


async def test_only_the_relevant_nodes_part_counts(store: Store) -> None:
    host1, host2 = store.as_writer("node.host1"), store.as_writer("node.host2")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))

    def claim(obj: Any) -> None:
        obj.status.state = "Running"
        obj.status.node = "host2"

    before = await get_vm(store)
    await host2.patch_status("VirtualMachine", "vm1", claim)  # not placed there: ignored
    after = await get_vm(store)
    assert after.status == before.status
    assert after.metadata.resource_version == before.metadata.resource_version
    await host1.patch_status("VirtualMachine", "vm1", claim)
    assert (await get_vm(store)).status.node == "host2"
    # ClusterNode X counts only X's part.
    await store.create(node("host1"))

    def online(obj: Any) -> None:
        obj.status.agent_version = "1"
        obj.status.health = "Online"

    await host2.patch_status("ClusterNode", "host1", online)
    host1_node = await store.get("ClusterNode", "host1")
    assert host1_node.status.agent_version is None
    await host1.patch_status("ClusterNode", "host1", online)
    host1_node = await store.get("ClusterNode", "host1")
    assert host1_node.status.agent_version == "1"
    assert host1_node.status.health == "Unknown", "health is the controller's"


async def test_a_write_to_any_part_conflicts_with_a_stale_read(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))
    stale = await get_vm(store)
    await host1.patch_status(
        "VirtualMachine", "vm1", lambda o: setattr(o.status, "state", "Running")
    )
    stale.status.message = "from a stale read"
    with pytest.raises(Conflict):
        await store.update_status(stale)
    with pytest.raises(Conflict):
        await host1.update_status(stale)
    stale.spec.vcpus = 2
    with pytest.raises(Conflict):
        await store.update(stale)
    fresh = await get_vm(store)
    fresh.spec.vcpus = 2
    updated = await store.update(fresh)
    assert updated.metadata.generation == 2
    assert updated.status.state == "Running", "a spec write keeps every part"


async def test_concurrent_writers_of_different_parts_lose_nothing(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))

    def add(condition: str) -> Any:
        def mutate(obj: Any) -> None:
            obj.status.set_condition(condition, "True", "Set", "")

        return mutate

    names = [f"C{i}" for i in range(6)]
    await asyncio.gather(
        *(
            (store if i % 2 else host1).patch_status("VirtualMachine", "vm1", add(name))
            for i, name in enumerate(names)
        )
    )
    merged = await get_vm(store)
    assert sorted(c.type for c in merged.status.conditions) == names


async def test_node_finalizer_holds_deletion_until_the_controller_collects(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))
    await host1.add_finalizer("VirtualMachine", "vm1", "kvmctl.io/domain")
    assert (await raw(store, "kinds/VirtualMachine/spec/vm1"))["metadata"]["finalizers"] == []
    assert (await get_vm(store)).metadata.finalizers == ["kvmctl.io/domain"]
    marked = await store.delete("VirtualMachine", "vm1")
    assert marked is not None and marked.metadata.deletion_timestamp is not None
    assert not await store.collect_garbage("VirtualMachine", "vm1"), "a finalizer remains"
    await host1.remove_finalizer("VirtualMachine", "vm1", "kvmctl.io/domain")
    left = await get_vm(store)
    assert left.metadata.finalizers == [] and left.metadata.deletion_timestamp is not None
    assert await store.collect_garbage("VirtualMachine", "vm1")
    assert await store.try_get("VirtualMachine", "vm1") is None
    everything, _ = await store.client.get_prefix(store.kind_prefix("VirtualMachine")), None
    assert len(everything) == 0, "spec and every part deleted"


async def test_a_recreated_object_does_not_inherit_an_old_part(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    await store.create(vm())
    await store.patch_status("VirtualMachine", "vm1", place("host1"))
    await host1.patch_status(
        "VirtualMachine", "vm1", lambda o: setattr(o.status, "state", "Crashed")
    )
    old_part = await raw(store, "kinds/VirtualMachine/status/node.host1/vm1")
    await store.delete("VirtualMachine", "vm1")
    await store.create(vm())
    # a leftover part (written by hand, or by a node racing the deletion) with the old uid
    await store.client.put(
        store.part_key("VirtualMachine", "vm1", "node.host1"), json.dumps(old_part).encode()
    )
    await store.patch_status("VirtualMachine", "vm1", place("host1"))
    assert (await get_vm(store)).status.state == "Unknown"


async def test_events_of_each_writer_live_apart(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    target = await store.create(vm())
    await EventRecorder(store, "kvmctl-controller").record(target, "Normal", "Seen", "seen")
    await EventRecorder(host1, "kvmctl-agent", "host1").record(target, "Normal", "Seen", "seen")
    events, _ = await store.list_objects("Event")
    assert len(events) == 2 and len({e.metadata.name for e in events}) == 2
    assert sorted(e.spec.source.component for e in events if isinstance(e, Event)) == [
        "kvmctl-agent",
        "kvmctl-controller",
    ]
    prefix = store.kind_prefix("Event")
    keys = sorted(
        kv.key[len(prefix) :].decode().split("/")[0] for kv in await store.client.get_prefix(prefix)
    )
    assert keys == ["node.host1", "spec"]
    # recording again aggregates in the writer's own subtree
    await EventRecorder(host1, "kvmctl-agent", "host1").record(target, "Normal", "Seen", "seen")
    counts = sorted(
        e.spec.count for e in (await store.list_objects("Event"))[0] if isinstance(e, Event)
    )
    assert counts == [1, 2]


async def test_watch_yields_merged_objects(store: Store) -> None:
    host1 = store.as_writer("node.host1")
    _, revision = await store.list_objects("VirtualMachine")
    seen: list[WatchEvent] = []

    async def watch() -> None:
        async for event in store.watch("VirtualMachine", revision + 1):
            seen.append(event)

    task = asyncio.create_task(watch())
    try:
        await store.create(vm())
        await store.patch_status("VirtualMachine", "vm1", place("host1"))
        await store.as_writer("node.host2").patch_status(
            "VirtualMachine", "vm1", lambda o: setattr(o.status, "state", "Paused")
        )  # not placed on host2: no event
        await host1.patch_status(
            "VirtualMachine", "vm1", lambda o: setattr(o.status, "state", "Running")
        )
        await store.delete("VirtualMachine", "vm1")
        await eventually(lambda: len(seen) >= 4, "four events")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [e.type for e in seen] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]
    running = seen[2].object
    assert isinstance(running, VirtualMachine) and running.status.state == "Running"
    assert running.status.placement is not None and running.status.placement.node == "host1"
    assert seen[-1].object.status.state == "Running"


def test_a_writer_must_be_the_controller_or_a_node() -> None:
    for writer in ("admin", "node.", "node.Host1", "node.host1/x", "controller "):
        with pytest.raises(ValueError, match=r"must be 'controller' or 'node\.<node name>'"):
            Store(["127.0.0.1:9"], writer=writer)


async def test_status_writes_need_parts(store: Store) -> None:
    target = await store.create(vm())
    await EventRecorder(store, "kvmctl-controller").record(target, "Normal", "Seen", "seen")
    event = (await store.list_objects("Event"))[0][0]
    with pytest.raises(StoreError, match="Event has no status parts"):
        await store.update_status(event)
