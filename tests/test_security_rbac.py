"""Attacks with one host's agent certificate, against a real etcd with TLS and `apply_rbac`.

An agent owns only its node's keys (controller/runtime/layout.py): every attempt below to change
what the admin or the controller decides, or another node's report, is refused by etcd itself
(PermissionDenied) and leaves every key as it was. Its own status part still works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.rbac import apply_rbac, cluster_roles
from controller.runtime.events import EventRecorder
from controller.runtime.store import PermissionDenied, Store
from crds import AnyResource, VirtualMachine, parse_object
from crds.meta import now
from crds.virtualmachine import Disk, Placement
from e2e.harness.etcd import EtcdCluster
from tests.support.rbac import make_pki, store_as

NODES = ["host1", "host2"]


def manifest(kind: str, name: str, spec: dict[str, Any]) -> AnyResource:
    return parse_object(
        {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def placed(node: str) -> Callable[[Any], None]:
    def mutate(obj: Any) -> None:
        obj.status.placement = Placement(node=node, token=1, since=now())

    return mutate


async def _setup(etcd: EtcdCluster, pki: Path) -> None:
    async with store_as(etcd, pki, "admin") as admin:
        for name in NODES:
            await admin.create(
                manifest("ClusterNode", name, {"addresses": {"cluster": "10.0.0.1"}})
            )
        for vm, node in (("vm1", "host1"), ("vm2", "host2")):
            await admin.create(manifest("VirtualMachine", vm, {"memoryMiB": 64}))
            await admin.patch_status("VirtualMachine", vm, placed(node))
        await apply_rbac(admin, cluster_roles(NODES))
    async with store_as(etcd, pki, "controller") as controller:
        vm2 = await controller.get("VirtualMachine", "vm2")
        await EventRecorder(controller, "kvmctl-controller").record(
            vm2, "Normal", "Placed", "on host2"
        )
    async with store_as(etcd, pki, "agent-host2") as agent2:
        host2 = agent2.as_writer("node.host2")
        vm2 = await host2.get("VirtualMachine", "vm2")
        await EventRecorder(host2, "kvmctl-agent", "host2").record(vm2, "Normal", "Started", "up")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, Path]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with EtcdCluster(pki=pki) as cluster:
        asyncio.run(_setup(cluster, pki))
        yield cluster, pki


@pytest.fixture
async def admin(etcd: tuple[EtcdCluster, Path]) -> AsyncIterator[Store]:
    async with store_as(*etcd, "admin") as store:
        yield store


@pytest.fixture
async def agent(etcd: tuple[EtcdCluster, Path]) -> AsyncIterator[Store]:
    async with store_as(*etcd, "agent-host1") as store:
        yield store.as_writer("node.host1")


async def dump(store: Store) -> dict[bytes, bytes]:
    """Every key of the cluster and its value (read as the admin)."""
    prefix = f"{store.prefix}/".encode()
    return {kv.key: kv.value for kv in await store.client.get_prefix(prefix)}


async def refused(admin: Store, attack: Awaitable[Any]) -> PermissionDenied:
    before = await dump(admin)
    with pytest.raises(PermissionDenied) as error:
        await attack
    assert await dump(admin) == before, "nothing written"
    return error.value


async def test_agent_cannot_rewrite_another_vms_spec(admin: Store, agent: Store) -> None:
    vm2 = await agent.get("VirtualMachine", "vm2")
    assert isinstance(vm2, VirtualMachine)
    vm2.spec.disks.append(Disk(file="/dev/sda"))
    error = await refused(admin, agent.update(vm2))
    assert "write of kinds/VirtualMachine/spec/vm2: user agent-host1" in str(error)


async def test_agent_cannot_write_a_placement(admin: Store, agent: Store) -> None:
    as_controller = agent.as_writer("controller")
    error = await refused(
        admin, as_controller.patch_status("VirtualMachine", "vm2", placed("host1"))
    )
    assert "kinds/VirtualMachine/status/controller/vm2" in str(error)
    # Its own part may say anything: a placement in it is not the controller's and does not count.
    await agent.patch_status("VirtualMachine", "vm2", placed("host1"))
    vm2 = await admin.get("VirtualMachine", "vm2")
    assert isinstance(vm2, VirtualMachine)
    assert vm2.status.placement is not None and vm2.status.placement.node == "host2"


async def test_agent_cannot_write_another_nodes_part(admin: Store, agent: Store) -> None:
    as_host2 = agent.as_writer("node.host2")

    def crashed(obj: Any) -> None:
        obj.status.state = "Crashed"

    error = await refused(admin, as_host2.patch_status("VirtualMachine", "vm2", crashed))
    assert "kinds/VirtualMachine/status/node.host2/vm2" in str(error)

    def offline(obj: Any) -> None:
        obj.status.message = "gone"

    error = await refused(admin, as_host2.patch_status("ClusterNode", "host2", offline))
    assert "kinds/ClusterNode/status/node.host2/host2" in str(error)


async def test_agent_cannot_write_its_own_cluster_node_spec(admin: Store, agent: Store) -> None:
    host1 = await agent.get("ClusterNode", "host1")
    host1.spec.fencing = host1.spec.fencing.model_validate(
        {"methods": [{"name": "m", "devices": [{"agent": "fence_virsh", "parameters": {}}]}]}
    )
    error = await refused(admin, agent.update(host1))
    assert "write of kinds/ClusterNode/spec/host1" in str(error)


async def test_agent_cannot_delete_or_create_objects(admin: Store, agent: Store) -> None:
    error = await refused(admin, agent.delete("VirtualMachine", "vm2"))
    assert "delete of kinds/VirtualMachine/spec/vm2" in str(error)
    migration = manifest("VirtualMachineMigration", "steal", {"vm": "vm2", "targetNode": "host1"})
    error = await refused(admin, agent.create(migration))
    assert "write of kinds/VirtualMachineMigration/spec/steal" in str(error)
    await refused(admin, agent.create(manifest("VirtualMachine", "vm3", {"memoryMiB": 64})))


async def test_agent_cannot_delete_or_rewrite_others_events(admin: Store, agent: Store) -> None:
    events, _ = await admin.list_objects("Event")
    assert len(events) == 2
    client = agent.client
    for kv in await admin.client.get_prefix(admin.kind_prefix("Event")):
        await refused(admin, agent.call(client.delete(kv.key), kv.key, "delete"))
        await refused(admin, agent.call(client.put(kv.key, b"{}"), kv.key, "write"))
    by_controller = agent.as_writer("controller")
    name = next(e.metadata.name for e in events if e.spec.source.component == "kvmctl-controller")
    await refused(admin, by_controller.delete("Event", name))


async def test_agent_cannot_touch_the_layout_marker_or_secrets(admin: Store, agent: Store) -> None:
    marker = agent.raw_key("layout")
    await refused(admin, agent.call(agent.client.put(marker, b"1"), marker, "write"))
    secret = manifest("Secret", "forged", {"data": {"password": "x"}})
    await refused(admin, agent.create(secret))


async def test_agent_reports_on_its_own_vm_and_records_events(admin: Store, agent: Store) -> None:
    def running(obj: Any) -> None:
        obj.status.state, obj.status.node = "Running", "host1"

    written = await agent.patch_status("VirtualMachine", "vm1", running)
    assert written.status.state == "Running"
    vm1 = await admin.get("VirtualMachine", "vm1")
    assert vm1.status.state == "Running" and vm1.status.placement.node == "host1"
    await EventRecorder(agent, "kvmctl-agent", "host1").record(vm1, "Normal", "Started", "up")
    events, _ = await admin.list_objects("Event")
    assert any(e.spec.source.node == "host1" for e in events)
