"""Failover in the reference topology users run (issue 11): etcd and the controllers on the
hosts themselves, so a dead host takes an etcd member, and maybe etcd's leader or the leading
controller, with it.

One cluster for the module (`e2e.harness.topology`, `reference`: host1 and host2 run VMs; `storage`
runs tgtd, the third etcd member and a controller, and is cordoned). Every case runs with the
two-copies checker sampling every host's qemu processes, and fails if a VM ever had a qemu
process on two hosts at once. Roles are arranged before the power cut (etcd's leadership moved
with `etcdctl move-leader`, a leading controller on the storage host restarted so it resigns),
so each case cuts the host holding exactly the roles it is about. After each case every host is
powered on again and every VM deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from functools import partial

import pytest

from controller.runtime.store import NotFound, Store, Unavailable
from crds import ClusterNode
from e2e.guest.build import GuestImage, ensure_guest_image
from e2e.harness import polling
from e2e.harness.chaos import TwoCopiesChecker, guest_vm, ipmi_node, ipmi_secret, leader_host
from e2e.harness.cluster import Cluster
from e2e.harness.topology import (
    every_host_online,
    lead_controllers_from,
    move_etcd_leader,
    node_down,
    node_online,
    storage_node,
    topology_cluster,
)

pytestmark = pytest.mark.slow

DEADLINE = 150.0
"""Generous: two loaded cores, TCG guests, an etcd election on top of the failover."""
eventually = partial(polling.eventually, timeout=DEADLINE, retry_on=(Unavailable,))
"""The test's own reads ride out etcd's election when the victim held etcd's leader."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reference = topology_cluster("reference")
    reference.start()
    try:
        yield reference
    finally:
        reference.stop()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return ensure_guest_image()


class Case:
    """One case's view of the cluster: its store, the checker and the role arrangements."""

    def __init__(self, cluster: Cluster, store: Store, image: GuestImage) -> None:
        self.cluster = cluster
        self.store = store
        self.image = image
        self.checker = TwoCopiesChecker(cluster)

    async def all_online(self) -> bool:
        return await every_host_online(self.cluster, self.store)

    async def controller_leader(self) -> str:
        leader: str = await eventually(partial(leader_host, self.store), "a leading controller")
        return leader

    async def lead_controllers_from_a_kvm_host(self) -> str:
        """The KVM host whose controller leads (the storage host's is restarted until it does
        not lead: it resigns on SIGTERM)."""
        return await lead_controllers_from(self.cluster, self.store, self.cluster.kvm_hosts)

    async def move_etcd_leader(self, name: str) -> None:
        await move_etcd_leader(self.cluster, name)

    async def start_vm(self, name: str, preferred: list[str]) -> None:
        await self.store.create(guest_vm(name, self.image, preferred))

        async def running() -> bool:
            return self.checker.where(name) == (preferred[0],)

        await eventually(running, f"{name} running on {preferred[0]}")

    async def one_vm_per_kvm_host(self) -> dict[str, str]:
        """vm-host1 on host1, vm-host2 on host2, each preferring the other next; host -> VM."""
        first, second = self.cluster.kvm_hosts
        vms = {first: f"vm-{first}", second: f"vm-{second}"}
        await self.start_vm(vms[first], [first, second])
        await self.start_vm(vms[second], [second, first])
        return vms

    async def power_cut_recovers(self, victim: str, vms: dict[str, str]) -> None:
        """Cut the victim's power: its VM ends up running on the other KVM host, once, and the
        other host's VM stays where it was."""
        survivor = next(name for name in self.cluster.kvm_hosts if name != victim)
        await asyncio.to_thread(self.cluster.kill_host, victim)

        async def recovered() -> bool:
            return self.checker.where(vms[victim]) == (survivor,)

        await eventually(recovered, f"{vms[victim]} running again on {survivor}")
        await asyncio.to_thread(self.checker.wait_sample)
        assert self.checker.where(vms[survivor]) == (survivor,)
        node = await self.store.get("ClusterNode", victim)
        assert isinstance(node, ClusterNode) and node.status.fence is not None
        assert node.status.fence.how == "PowerOff", node.status.fence
        assert self.checker.violations == [], self.checker.violations

    async def reset(self) -> None:
        """Power every host on again, delete every VM, wait until no qemu is left."""
        for name, host in self.cluster.lab.hosts.items():
            if not host.is_running():
                await asyncio.to_thread(self.cluster.restore, name)
        objects, _ = await self.store.list_objects("VirtualMachine")
        for vm in objects:
            with contextlib.suppress(NotFound):
                await self.store.delete("VirtualMachine", vm.metadata.name)
        await eventually(lambda: not self.checker.running(), "every qemu gone")
        await eventually(self.no_vm_left, "every VM object gone (finalizers removed)")
        await eventually(self.all_online, "every host Online again")

    async def no_vm_left(self) -> bool:
        objects, _ = await self.store.list_objects("VirtualMachine")
        return not objects


@pytest.fixture
async def case(cluster: Cluster, image: GuestImage) -> AsyncIterator[Case]:
    async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
        if await store.try_get("Secret", "ipmi") is None:
            await store.create(ipmi_secret(cluster.bmc_password))
            for name in cluster.kvm_hosts:
                await store.create(ipmi_node(cluster, name))
            await store.create(storage_node(cluster))
        this = Case(cluster, store, image)
        with this.checker:
            await eventually(this.all_online, "every host Online")
            try:
                yield this
            finally:
                await this.reset()
        assert this.checker.violations == [], this.checker.violations


async def test_power_cut_of_the_leading_controllers_host_recovers_its_vm_once(case: Case) -> None:
    vms = await case.one_vm_per_kvm_host()
    victim = await case.lead_controllers_from_a_kvm_host()
    await case.move_etcd_leader(victim)  # the worst case: it leads etcd too
    assert await case.controller_leader() == victim
    await case.power_cut_recovers(victim, vms)
    assert await case.controller_leader() != victim


async def test_power_cut_of_etcds_leader_host_recovers_its_vm_once(case: Case) -> None:
    vms = await case.one_vm_per_kvm_host()
    controller_leader = await case.lead_controllers_from_a_kvm_host()
    victim = next(name for name in case.cluster.kvm_hosts if name != controller_leader)
    await case.move_etcd_leader(victim)  # etcd's leader only: the controllers lead elsewhere
    assert await case.controller_leader() != victim
    await case.power_cut_recovers(victim, vms)


async def test_a_host_powered_on_again_rejoins_etcd_as_the_same_member(case: Case) -> None:
    host_etcd = case.cluster.host_etcd
    assert host_etcd is not None
    members = await asyncio.to_thread(host_etcd.members)
    assert sorted(member.name for member in members) == sorted(case.cluster.lab.hosts)
    victim = case.cluster.kvm_hosts[0]
    await case.move_etcd_leader(victim)  # its member comes back as a follower of another
    await asyncio.to_thread(case.cluster.kill_host, victim)
    assert not await asyncio.to_thread(host_etcd.healthy, victim)
    # Power on only once the cluster is done with the loss: a host powered on while a fence of
    # it is in flight (the standby's, when it held the leading controller) is powered off again.
    await eventually(partial(node_down, case.store, victim), f"{victim} Fenced or Offline")

    await asyncio.to_thread(case.cluster.restore, victim)
    assert await asyncio.to_thread(host_etcd.members) == members
    for name in case.cluster.etcd_hosts:
        assert await asyncio.to_thread(host_etcd.healthy, name), f"etcd member {name} unhealthy"
    await eventually(partial(node_online, case.store, victim), f"{victim}'s agent Online again")
    assert victim in case.cluster.controllers
