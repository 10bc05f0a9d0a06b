"""The Bond reconciler on the host kernel, each test in a fresh network namespace and etcd prefix.

This kernel has no bonding: here the reconciler must say so clearly and create nothing, refuse
bad input before touching anything, and converge the bridge and address parts (with a veth
standing in for the bond). The bond itself converges in the kernel lab
(e2e/lab_tests/test_bond_reconciler_lab.py).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator
from ipaddress import ip_address
from typing import NoReturn

import pytest

from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer
from controller.runtime.store import Store
from crds import Bond, ClusterNode, Event, ObjectMeta
from crds.bond import BondSpec
from crds.clusternode import ClusterNodeSpec, NodeAddresses
from e2e.harness.polling import eventually
from reconcilers.bond import BondReconciler
from reconcilers.bond_converge import BondConverger, BondProblem
from reconcilers.bond_links import bond_keys_for_link, watch_bond_links
from reconcilers.drivers.netlink import Netlink
from reconcilers.storage import StorageSettings, run_storage_reconcilers

NODE = "host1"
CLUSTER_ADDRESS = "10.77.0.1"
DEADLINE = 30.0
FLOOD_PAIRS = 1000
"""veth pairs created at once: their 2000 events overflow a 1 MiB netlink receive buffer."""


@pytest.fixture
async def nl(netns: str) -> AsyncIterator[Netlink]:
    async with Netlink(netns) as driver:
        await driver.set_up("lo")
        for nic in ("eth0", "eth2"):
            await driver.create_veth(nic, f"sw-{nic}")
            await driver.set_up(f"sw-{nic}")
        yield driver


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    async with Store(etcd_endpoints, prefix=key_prefix) as store:
        await store.create(
            ClusterNode(
                metadata=ObjectMeta(name=NODE),
                spec=ClusterNodeSpec(addresses=NodeAddresses(cluster=ip_address(CLUSTER_ADDRESS))),
            )
        )
        yield store


def bond_object(**spec: object) -> Bond:
    fields: dict[str, object] = {"node": NODE, "interface": "bond0", "slaves": ["eth0", "eth2"]}
    fields.update(spec)
    return Bond(metadata=ObjectMeta(name="bond0"), spec=BondSpec.model_validate(fields))


async def reconcile(store: Store, netns: str, bond: Bond) -> Bond:
    await store.create(bond)
    reconciler = BondReconciler(store, NODE, EventRecorder(store, "agent", NODE), netns=netns)
    await reconciler.reconcile(bond.metadata.name)
    stored = await store.get("Bond", bond.metadata.name)
    assert isinstance(stored, Bond)
    return stored


async def warnings(store: Store) -> list[tuple[str, str]]:
    objects, _ = await store.list_objects("Event")
    return [
        (e.spec.reason, e.spec.message)
        for e in objects
        if isinstance(e, Event) and e.spec.type == "Warning"
    ]


def ready(bond: Bond) -> tuple[str, str, str]:
    condition = bond.status.condition("Ready")
    assert condition is not None
    return condition.status, condition.reason, condition.message


async def test_no_bonding_in_the_kernel_is_a_clear_condition_and_nothing_is_created(
    store: Store, netns: str, nl: Netlink
) -> None:
    bond = await reconcile(
        store, netns, bond_object(bridge={"name": "br0", "addresses": ["10.77.0.1/24"]})
    )
    status, reason, message = ready(bond)
    if reason != "BondingUnsupported":
        pytest.skip("this kernel has bonding: the bond is tested in the kernel lab")
    assert status == "False"
    assert "no bonding support" in message
    assert ("BondingUnsupported", message) in await warnings(store)
    names = {link.name for link in await nl.links()}
    assert "bond0" not in names and "br0" not in names
    assert all(link.master is None for link in await nl.links())


async def test_a_missing_slave_is_reported_and_nothing_is_created(
    store: Store, netns: str, nl: Netlink
) -> None:
    bond = await reconcile(store, netns, bond_object(slaves=["eth0", "eth9"]))
    status, reason, message = ready(bond)
    assert (status, reason) == ("False", "SlaveMissing")
    assert message == "slave eth9 of bond bond0 does not exist on this node"
    assert ("SlaveMissing", message) in await warnings(store)
    assert not await nl.exists("bond0")
    assert (await nl.link("eth0")).master is None


async def test_a_bond_name_taken_by_another_kind_of_link_is_a_conflict(
    store: Store, netns: str, nl: Netlink
) -> None:
    await nl.create_veth("bond0", "bond0-peer")
    bond = await reconcile(store, netns, bond_object())
    status, reason, message = ready(bond)
    assert (status, reason) == ("False", "InterfaceConflict")
    assert message.startswith("bond0 exists as a veth link, not a bond")


async def test_the_nic_carrying_the_cluster_network_is_not_enslaved_without_permission(
    store: Store, netns: str, nl: Netlink
) -> None:
    await nl.set_up("eth0")
    await nl.add_address("eth0", f"{CLUSTER_ADDRESS}/24")
    bond = await reconcile(
        store, netns, bond_object(bridge={"name": "br0", "addresses": ["10.77.0.1/24"]})
    )
    status, reason, message = ready(bond)
    assert (status, reason) == ("False", "DisruptionNotAllowed")
    assert "enslaving eth0 to bond0 would cut the cluster network" in message
    assert "allowDisruption" in message
    assert ("DisruptionNotAllowed", message) in await warnings(store)
    assert f"{CLUSTER_ADDRESS}/24" in {a.cidr for a in await nl.addresses("eth0")}
    assert not await nl.exists("bond0") and not await nl.exists("br0")


async def test_bridge_takes_over_the_port_and_its_cluster_address_without_a_gap(
    nl: Netlink,
) -> None:
    """The bridge part of a pass, with a veth named bond0 standing in for the bond."""
    await nl.create_veth("bond0", "bond0-peer")
    await nl.set_up("bond0")
    await nl.add_address("bond0", f"{CLUSTER_ADDRESS}/24")
    await nl.create_bridge("br0")
    await nl.add_address("br0", "192.0.2.5/24")  # drift: not in the spec
    spec = bond_object(
        mtu=1400, bridge={"name": "br0", "addresses": [f"{CLUSTER_ADDRESS}/24"]}
    ).spec
    converger = BondConverger(nl, spec, CLUSTER_ADDRESS)
    await converger.refresh()
    assert converger.protected == {"bond0"}

    await converger.converge_bridge("bond0")
    await converger.converge_addresses("br0", [f"{CLUSTER_ADDRESS}/24"])
    await converger.converge_addresses("bond0", [])

    bridge, port = await nl.link("br0"), await nl.link("bond0")
    assert port.master == "br0"
    assert bridge.up and bridge.mtu == 1400
    bridge_cidrs = {a.cidr for a in await nl.addresses("br0")}
    assert f"{CLUSTER_ADDRESS}/24" in bridge_cidrs and "192.0.2.5/24" not in bridge_cidrs
    assert all(a.cidr.startswith("fe80") for a in await nl.addresses("bond0"))
    assert "enslaved bond0 to bridge br0" in converger.actions

    again = BondConverger(nl, spec, CLUSTER_ADDRESS)
    await again.refresh()
    assert again.protected == {"br0", "bond0"}
    await again.converge_bridge("bond0")
    await again.converge_addresses("br0", [f"{CLUSTER_ADDRESS}/24"])
    assert again.actions == []


async def test_the_cluster_address_is_kept_unless_disruption_is_allowed(nl: Netlink) -> None:
    await nl.create_bridge("br0")
    await nl.add_address("br0", f"{CLUSTER_ADDRESS}/24")
    spec = bond_object(bridge={"name": "br0", "addresses": ["10.88.0.1/24"]}).spec
    converger = BondConverger(nl, spec, CLUSTER_ADDRESS)
    await converger.refresh()
    with pytest.raises(BondProblem, match=r"removing 10\.77\.0\.1/24 from br0 would cut"):
        await converger.converge_addresses("br0", ["10.88.0.1/24"])
    assert f"{CLUSTER_ADDRESS}/24" in {a.cidr for a in await nl.addresses("br0")}

    allowed = bond_object(
        allowDisruption=True, bridge={"name": "br0", "addresses": ["10.88.0.1/24"]}
    ).spec
    converger = BondConverger(nl, allowed, CLUSTER_ADDRESS)
    await converger.refresh()
    await converger.converge_addresses("br0", ["10.88.0.1/24"])
    cidrs = {a.cidr for a in await nl.addresses("br0")}
    assert "10.88.0.1/24" in cidrs and f"{CLUSTER_ADDRESS}/24" not in cidrs


def test_link_names_map_to_the_bonds_of_this_node() -> None:
    here = bond_object(bridge={"name": "br0"})
    elsewhere = Bond(
        metadata=ObjectMeta(name="other"),
        spec=BondSpec(node="host2", interface="bond0", slaves=["eth0"]),
    )
    for link in ("bond0", "eth0", "eth2", "br0"):
        assert bond_keys_for_link([here, elsewhere], NODE, link) == ["bond0"]
    assert bond_keys_for_link([here, elsewhere], NODE, "eth1") == []


class KeyList:
    """A queue stand-in that records the keys it is given."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def add(self, key: str) -> None:
        self.keys.append(key)


def raise_if_ended(watch: asyncio.Task[object]) -> None:
    """Fail at once, with the watcher's own error, when the link watch has died."""
    if watch.done():
        watch.result()  # re-raises what killed it
        pytest.fail("the link watch ended without an error")


async def enqueued_by_toggling(nl: Netlink, watch: asyncio.Task[NoReturn], keys: KeyList) -> None:
    """Toggle eth0 until the watch (subscribing in the background) enqueues a key."""

    async def toggled_and_enqueued() -> bool:
        raise_if_ended(watch)
        if keys.keys:
            return True
        toggle = nl.set_down if (await nl.link("eth0")).up else nl.set_up
        await toggle("eth0")
        return False

    await eventually(toggled_and_enqueued, "a key enqueued for a link change", timeout=DEADLINE)


@pytest.fixture
async def informer(store: Store) -> AsyncIterator[Informer]:
    await store.create(bond_object())
    informer = Informer(store, "Bond", resync_period=None)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.has_synced.wait(), DEADLINE)
        yield informer
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_slave_losing_carrier_enqueues_its_bond(
    informer: Informer, netns: str, nl: Netlink
) -> None:
    keys = KeyList()
    watch = asyncio.create_task(watch_bond_links(netns, NODE, informer, keys))
    try:
        await enqueued_by_toggling(nl, watch, keys)
        assert set(keys.keys) == {"bond0"}
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


def flood_links_with_the_event_loop_stalled(netns: str, pairs: int) -> None:
    """Create `pairs` veth pairs while blocking the event loop on purpose (a synchronous
    subprocess): nobody reads the monitor socket, so the kernel overflows it (ENOBUFS)."""
    batch = "".join(f"link add flood{i} type veth peer name flood{i}p\n" for i in range(pairs))
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch.encode(), check=True)


async def test_a_link_watch_that_falls_behind_resyncs_every_bond(
    informer: Informer, netns: str, nl: Netlink, caplog: pytest.LogCaptureFixture
) -> None:
    keys = KeyList()
    watch = asyncio.create_task(watch_bond_links(netns, NODE, informer, keys))
    try:
        await enqueued_by_toggling(nl, watch, keys)
        keys.keys.clear()
        with caplog.at_level(logging.WARNING, logger="reconcilers.bond"):
            flood_links_with_the_event_loop_stalled(netns, FLOOD_PAIRS)

            def resynced() -> bool:
                raise_if_ended(watch)
                return "dropped events" in caplog.text and "bond0" in keys.keys

            await eventually(resynced, "every Bond enqueued after the overflow", timeout=DEADLINE)
        assert f"watch links in {netns}" in caplog.text
        # The new watch works: a later change is seen again.
        keys.keys.clear()
        await enqueued_by_toggling(nl, watch, keys)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_the_storage_loop_reconciles_this_nodes_bonds_only(
    store: Store, netns: str, nl: Netlink
) -> None:
    other = bond_object(node="host2", slaves=["eth0", "eth9"])
    other.metadata.name = "bond-of-host2"
    await store.create(other)
    settings = StorageSettings(netns=netns, resync_period=None)
    recorder = EventRecorder(store, "agent", NODE)
    loop = asyncio.create_task(run_storage_reconcilers(store, NODE, recorder, settings))
    try:
        await store.create(bond_object(slaves=["eth0", "eth9"]))

        async def reported() -> Bond | None:
            raise_if_ended(loop)
            bond = await store.get("Bond", "bond0")
            assert isinstance(bond, Bond)
            return bond if bond.status.condition("Ready") is not None else None

        bond = await eventually(reported, "bond0 reconciled by the storage loop")
        assert ready(bond)[:2] == ("False", "SlaveMissing")
        # Listed first, so handled first by the one worker, if at all: host2's is left alone.
        assert (await store.get("Bond", "bond-of-host2")).status.condition("Ready") is None
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
