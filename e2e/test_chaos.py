"""Chaos on real parts: the HA controller against power cuts, network cuts, a dying leader, a
broken fence device and hung agents (issue 5, item 7).

One cluster for the module (`e2e.harness.chaos.ChaosCluster`: etcd, host1..host3 each with libvirtd,
`kvmctl agent --watchdog` fed to a watchdog stand-in, `kvmctl controller`, and a simulated IPMI
BMC). Every case runs with the two-copies checker sampling every host's qemu processes every
100 ms, and fails if a VM ever had a qemu process on two hosts at once. After each case every
host is powered on / reconnected, fencing is reset to IPMI, and every VM is deleted.

Victims are chosen among the hosts whose controller does not lead, except where the case is the
leader's death, so each case waits for one failover, not an election as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from functools import partial

import pytest

from controller.apply import apply_one
from controller.runtime import layout_keys
from controller.runtime.store import NotFound, Store
from crds import ClusterNode, Event
from e2e.guest.build import GuestImage, ensure_guest_image
from e2e.harness import polling
from e2e.harness.chaos import (
    IPMI_SECRET,
    ChaosCluster,
    TwoCopiesChecker,
    guest_vm,
    ipmi_node,
    ipmi_secret,
    leader_host,
)
from e2e.harness.cluster import KVMCTL

pytestmark = pytest.mark.slow

DEADLINE = 120.0
eventually = partial(polling.eventually, timeout=DEADLINE)
"""Generous: two cores, TCG guests, other work running."""
WRONG_SECRET = "ipmi-wrong"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ChaosCluster]:
    chaos_cluster = ChaosCluster(("host1", "host2", "host3"), watchdog=True)
    chaos_cluster.start()
    try:
        yield chaos_cluster
    finally:
        chaos_cluster.stop()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return ensure_guest_image()


class Chaos:
    """One case's view of the cluster: the store, the checker, and waiting helpers."""

    def __init__(self, cluster: ChaosCluster, store: Store, image: GuestImage) -> None:
        self.cluster = cluster
        self.store = store
        self.image = image
        self.checker = TwoCopiesChecker(cluster)
        self.started_wall = datetime.now(UTC)

    async def node(self, name: str) -> ClusterNode:
        node = await self.store.get("ClusterNode", name)
        assert isinstance(node, ClusterNode)
        return node

    async def set_fencing(self, name: str, *, secret: str = IPMI_SECRET, self_fence: bool) -> None:
        wanted = ipmi_node(self.cluster, name, secret=secret, self_fence=self_fence).spec
        node = await self.node(name)
        if node.spec != wanted:
            node.spec = wanted
            await apply_one(self.store, node)

    async def all_online(self) -> bool:
        for name in self.cluster.kvm_hosts:
            heartbeat = self.store.raw_key(layout_keys.heartbeat(name))
            if await self.store.client.get(heartbeat) is None:
                return False
            if (await self.node(name)).status.health != "Online":
                return False
        return True

    async def victims(self, count: int) -> list[str]:
        """`count` hosts whose controller does not lead (the leader's host comes last)."""
        leader = await leader_host(self.store)
        hosts = sorted(self.cluster.kvm_hosts, key=lambda name: name == leader)
        return hosts[:count]

    async def start_vm(self, name: str, preferred: list[str]) -> None:
        """Create a VM and wait until its qemu runs on its first preferred host."""
        await self.store.create(guest_vm(name, self.image, preferred))

        async def running() -> bool:
            return self.checker.where(name) == (preferred[0],)

        await eventually(running, f"{name} running on {preferred[0]}")

    async def recovered(self, vm: str, lost: str) -> str:
        """Wait until the VM runs on exactly one host other than `lost`; that host."""
        hosts: tuple[str, ...] = ()

        async def elsewhere() -> bool:
            nonlocal hosts
            hosts = self.checker.where(vm)
            return len(hosts) == 1 and hosts[0] != lost

        await eventually(elsewhere, f"{vm} running again elsewhere than {lost}")
        return hosts[0]

    async def fence_how(self, name: str) -> str | None:
        fence = (await self.node(name)).status.fence
        return None if fence is None else fence.how

    async def event_count(self, name: str, reason: str) -> int:
        """How many times `reason` was reported on object `name` during this case."""
        objects, _ = await self.store.list_objects("Event")
        return sum(
            event.spec.count
            for event in objects
            if isinstance(event, Event)
            and event.spec.involved_object.name == name
            and event.spec.reason == reason
            and event.spec.last_timestamp >= self.started_wall
        )

    async def kvmctl(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            KVMCTL,
            *args,
            env={**os.environ, **self.cluster.kvmctl_env()},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        return process.returncode or 0, output.decode()

    async def stays_put(self, vm: str, seconds: float) -> None:
        """The VM keeps running on one host, without restarting, for `seconds` (wall clock)."""
        where = self.checker.where(vm)
        since = time.monotonic()
        while time.monotonic() < since + seconds:
            assert self.checker.where(vm) == where, f"{vm} moved from {where}"
            await asyncio.sleep(0.2)
        assert len(self.checker.appearances(vm, since)) == 0, f"{vm} was started again"


@pytest.fixture
async def chaos(cluster: ChaosCluster, image: GuestImage) -> AsyncIterator[Chaos]:
    async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
        view = Chaos(cluster, store, image)
        await _reset(view)
        with view.checker:
            try:
                yield view
            finally:
                await _cleanup(view)
        assert view.checker.violations == [], "a VM ran on two hosts at once"


async def _reset(chaos: Chaos) -> None:
    """IPMI fencing with the right password on every host; every host Online."""
    store = chaos.store
    for secret in (ipmi_secret(chaos.cluster.bmc_password), ipmi_secret("wrong", WRONG_SECRET)):
        stored = await store.try_get("Secret", secret.metadata.name)
        if stored is None:
            await store.create(secret)
        elif stored.spec != secret.spec:
            stored.spec = secret.spec
            await apply_one(store, stored)
    for name in chaos.cluster.kvm_hosts:
        if await store.try_get("ClusterNode", name) is None:
            await store.create(ipmi_node(chaos.cluster, name))
        else:
            await chaos.set_fencing(name, self_fence=False)
    await eventually(chaos.all_online, "every host Online")


async def _cleanup(chaos: Chaos) -> None:
    """Power every host on / reconnect it, delete every VM, wait until no qemu runs."""
    for name in chaos.cluster.kvm_hosts:
        await asyncio.to_thread(chaos.cluster.restore, name)
    await eventually(chaos.all_online, "every host Online again")
    objects, _ = await chaos.store.list_objects("VirtualMachine")
    for vm in objects:
        with contextlib.suppress(NotFound):
            await chaos.store.delete("VirtualMachine", vm.metadata.name)

    async def all_gone() -> bool:
        remaining, _ = await chaos.store.list_objects("VirtualMachine")
        return not remaining and not chaos.checker.running()

    await eventually(all_gone, "every VM deleted and its qemu gone")


async def test_power_cut_host_vms_run_elsewhere(chaos: Chaos) -> None:
    """(a) SIGKILL of every process of a host (guests included): its VMs run elsewhere."""
    victim, survivor = await chaos.victims(2)
    await chaos.start_vm("cut-a", [victim, survivor])
    await chaos.start_vm("cut-b", [victim, survivor])
    await asyncio.to_thread(chaos.cluster.kill_host, victim)
    for vm in ("cut-a", "cut-b"):
        assert await chaos.recovered(vm, victim) != victim
    assert await chaos.fence_how(victim) == "PowerOff"


async def test_cut_off_self_fencing_host_stops_its_vms_before_they_run_elsewhere(
    chaos: Chaos,
) -> None:
    """(b) selfFence: the cut-off host destroys its VMs; the others restart them."""
    (victim,) = await chaos.victims(1)
    await chaos.set_fencing(victim, self_fence=True)
    await chaos.start_vm("island", [victim])
    await asyncio.to_thread(chaos.cluster.cut_network, victim)
    await chaos.recovered("island", victim)
    assert await chaos.fence_how(victim) == "SelfFence"
    host = chaos.cluster.host(victim)
    assert host.is_running() and not host.watchdog_fired(), "a healthy agent feeds its watchdog"
    assert "island" not in chaos.cluster.qemu_guests(victim)


async def test_leader_killed_mid_failover_next_leader_finishes_once(chaos: Chaos) -> None:
    """(c) The leader dies while fencing a lost host: the next leader recovers each VM once."""
    victim, _, leader = await chaos.victims(3)
    assert await leader_host(chaos.store) == leader
    vms = ["orphan-a", "orphan-b"]
    for vm in vms:
        await chaos.start_vm(vm, [victim])
    killed_at = time.monotonic()
    await asyncio.to_thread(chaos.cluster.kill_host, victim)

    async def fencing() -> bool:
        return (await chaos.node(victim)).status.health in ("Fencing", "Fenced")

    await eventually(fencing, f"{leader} fencing {victim}")
    chaos.cluster.kill_controller(leader)

    async def new_leader() -> bool:
        return await leader_host(chaos.store) not in (None, leader)

    await eventually(new_leader, "another controller leading")
    for vm in vms:
        await chaos.recovered(vm, victim)
    for vm in vms:
        await chaos.stays_put(vm, 3.0)
        started = chaos.checker.appearances(vm, killed_at)
        assert len(started) == 1, f"{vm} started {len(started)} times: {started}"


async def test_failing_fence_device_blocks_recovery_until_ack_or_fixed(chaos: Chaos) -> None:
    """(d) A fence device that fails (wrong password): nothing is recovered until an operator
    acknowledges the powered-off host, or the device works again."""
    powered_off, cut_off = await chaos.victims(2)
    for name in (powered_off, cut_off):
        await chaos.set_fencing(name, secret=WRONG_SECRET, self_fence=False)
    await chaos.start_vm("acked", [powered_off])
    await chaos.start_vm("fixed", [cut_off])
    await asyncio.to_thread(chaos.cluster.kill_host, powered_off)
    await asyncio.to_thread(chaos.cluster.cut_network, cut_off)
    await asyncio.to_thread(chaos.checker.wait_sample)

    async def failed_twice() -> bool:
        assert chaos.checker.where("acked") == ()
        assert chaos.checker.where("fixed") == (cut_off,)
        counts = [await chaos.event_count(name, "FencingFailed") for name in (powered_off, cut_off)]
        return min(counts) >= 2

    await eventually(failed_twice, "two failed fencing rounds for each host")
    for name in (powered_off, cut_off):
        assert (await chaos.node(name)).status.health == "Fencing"
    assert chaos.cluster.host(cut_off).is_running(), "a wrong password powers nothing off"

    status, output = await chaos.kvmctl("fence", "ack", powered_off)
    assert status == 0, output
    await chaos.recovered("acked", powered_off)
    assert await chaos.fence_how(powered_off) == "ManualAck"
    assert chaos.checker.where("fixed") == (cut_off,)

    secret = await chaos.store.get("Secret", WRONG_SECRET)
    secret.spec = ipmi_secret(chaos.cluster.bmc_password).spec
    await apply_one(chaos.store, secret)
    await chaos.recovered("fixed", cut_off)
    assert await chaos.fence_how(cut_off) == "PowerOff"
    assert not chaos.cluster.host(cut_off).is_running()


async def test_fence_ipmilan_powers_off_a_cut_off_host_through_its_bmc(chaos: Chaos) -> None:
    """(e) fence_ipmilan against the simulated BMC: the real power-fence path."""
    (victim,) = await chaos.victims(1)
    await chaos.start_vm("powered", [victim])
    await asyncio.to_thread(chaos.cluster.cut_network, victim)
    await chaos.recovered("powered", victim)
    node = await chaos.node(victim)
    assert node.status.fence is not None
    assert (node.status.fence.how, node.status.fence.method) == ("PowerOff", "ipmi")
    assert not chaos.cluster.host(victim).is_running(), "the BMC pulled the host's power"
    assert await chaos.event_count(victim, "NodeFenced") >= 1


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
async def test_hung_or_dead_agent_gets_its_host_reset_before_vms_move(
    chaos: Chaos, fault: str
) -> None:
    """(f) The agent alone stops (SIGSTOP) or dies (SIGKILL) while its guests keep running:
    the watchdog resets the host before any of its VMs starts elsewhere."""
    (victim,) = await chaos.victims(1)
    await chaos.set_fencing(victim, self_fence=True)
    await chaos.start_vm("watched", [victim])
    host = chaos.cluster.host(victim)
    faulted_at = time.monotonic()
    if fault == "SIGSTOP":
        chaos.cluster.stop_agent(victim)
    else:
        chaos.cluster.kill_agent(victim)
    await asyncio.to_thread(chaos.checker.wait_sample)
    assert chaos.checker.where("watched") == (victim,), "the guest outlives its agent"
    elsewhere = await chaos.recovered("watched", victim)
    await eventually(host.watchdog_fired, "the watchdog reset the host")
    last_on_victim = chaos.checker.last_seen("watched", victim)
    first_elsewhere = chaos.checker.first_seen("watched", elsewhere, faulted_at)
    assert last_on_victim is not None and first_elsewhere is not None
    assert last_on_victim < first_elsewhere
