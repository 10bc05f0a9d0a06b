"""Many objects' status written in few guarded transactions (`Store.patch_status_many`), and
the HA leader writing a step's placements that way, on a real etcd."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.ha.environment import Emit, Place, SetFailed
from controller.ha.production import EtcdEnvironment
from controller.ha.production_core import KINDS
from controller.migrations import Term
from controller.runtime.events import EventRecorder
from controller.runtime.informer import SharedInformers
from controller.runtime.leader_record import guard_compare
from controller.runtime.store import Conflict, NotFound, Store
from crds import VirtualMachine
from e2e.harness.polling import eventually
from tests.support.ha import TIMINGS, get_vm, node_object, recorded, vm_object

NAMES = [f"vm{i:02d}" for i in range(10)]
SMALL_TXN = 8
"""Room for three VMs (two compares each) and the guard: ten VMs take four transactions."""


def set_message(text: str) -> Any:
    def mutate(vm: Any) -> bool:
        vm.status.message = text
        return True

    return mutate


def guard(store: Store) -> Term:
    """A guard that holds while `{prefix}/test-term` does not exist."""
    key = f"{store.prefix}/test-term"
    return Term(0, [guard_compare(store.client, key, 0)])


async def messages(store: Store) -> dict[str, str]:
    vms, _ = await store.list_objects(VirtualMachine)
    return {vm.metadata.name: vm.status.message for vm in vms}


async def test_many_objects_are_written_in_chunks_under_the_guard(store: Store) -> None:
    for name in NAMES:
        await store.create(vm_object(name))
    mutations = {name: set_message(f"batched {name}") for name in NAMES}
    mutations["unchanged"] = lambda vm: False
    mutations["missing"] = set_message("never")
    await store.create(vm_object("unchanged"))
    informers = SharedInformers(store, None)
    cached = informers.informer(VirtualMachine)
    informers.start()
    await informers.wait_for_sync()

    result = await store.patch_status_many(
        "VirtualMachine", mutations, guard(store).guard, max_ops=SMALL_TXN
    )

    def all_seen() -> bool:  # the objects of one transaction share its revision
        vms = [cached.get(name) for name in NAMES]
        return all(vm is not None and vm.status.message.startswith("batched") for vm in vms)

    try:
        await eventually(all_seen, "every write seen by an informer")
    finally:
        await informers.stop()

    assert set(result.failed) == {"missing"}
    assert isinstance(result.failed["missing"], NotFound)
    assert set(result.written) == {*NAMES, "unchanged"}
    stored = await messages(store)
    assert {name: stored[name] for name in NAMES} == {n: f"batched {n}" for n in NAMES}
    assert stored["unchanged"] == ""
    for name in NAMES:  # what the batch returns is what a read gives, version included
        fresh = await store.get("VirtualMachine", name)
        assert fresh.metadata.resource_version == result.written[name].metadata.resource_version


async def test_a_conflict_on_one_object_costs_the_others_nothing(store: Store) -> None:
    for name in NAMES:
        await store.create(vm_object(name))
    prepared = await store.prepare_status_many(
        "VirtualMachine", {name: set_message(f"batched {name}") for name in NAMES}
    )
    other = store.as_writer("controller")

    def meanwhile(vm: Any) -> bool:
        vm.status.relocations = 7
        return True

    await other.patch_status("VirtualMachine", "vm04", meanwhile)  # after the batch's read

    result = await store.write_prepared(prepared, guard(store).guard, max_ops=SMALL_TXN)

    assert result.failed == {}
    assert await messages(store) == {n: f"batched {n}" for n in NAMES}
    vm04 = await get_vm(store, "vm04")
    assert vm04.status.relocations == 7, "the conflicting write was redone on the new copy"


async def test_a_failed_guard_writes_nothing(store: Store) -> None:
    for name in NAMES:
        await store.create(vm_object(name))
    term = guard(store)
    prepared = await store.prepare_status_many(
        "VirtualMachine", {name: set_message("deposed") for name in NAMES}
    )
    await store.client.put(f"{store.prefix}/test-term".encode(), b"another term")

    result = await store.write_prepared(prepared, term.guard, max_ops=SMALL_TXN)

    assert result.written == {}
    assert set(result.failed) == set(NAMES)
    assert all(isinstance(error, Conflict) for error in result.failed.values())
    assert set((await messages(store)).values()) == {""}


async def test_the_leader_writes_a_steps_placements_together_in_order(store: Store) -> None:
    await store.create(node_object("a"))
    for name in NAMES:
        await store.create(vm_object(name))
    informers = SharedInformers(store, None)
    for kind in KINDS:
        informers.informer(kind)
    informers.start()
    await informers.wait_for_sync()
    term = guard(store)
    env = EtcdEnvironment(
        store, informers, EventRecorder(store, "test"), term, asyncio.Event(), TIMINGS
    )
    try:
        async with env:
            await env.observe()
            actions = [
                action
                for name in NAMES
                for action in (Place(name, "a"), Emit("VirtualMachine", name, "Placed", "on a"))
            ]
            # A later write of the same step: applied after the placements, in order.
            await env.apply_step([*actions, SetFailed("vm00", True), Place("vm00", None)])
            assert not env.deposed
    finally:
        await informers.stop()
    for name in NAMES[1:]:
        vm = await get_vm(store, name)
        assert vm.status.placement is not None
        assert (vm.status.placement.node, vm.status.placement.token) == ("a", term.token)
    first = await get_vm(store, "vm00")
    assert first.status.placement is None
    assert first.status.condition("Failed") is not None
    for name in NAMES:
        assert await recorded(store, "VirtualMachine", name, {"Placed"})
