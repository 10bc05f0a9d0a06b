"""Storage-path loss through real daemons in one run (docs/ha.md, "Storage-path loss").

Two simulated KVM hosts (`ChaosCluster`: etcd outside them, libvirtd and a `kvmctl agent` in
each, one `kvmctl controller` on host2 (on both hosts in the last case), a simulated BMC per
host that fence_ipmilan powers off). The datastore is a FUSE mount on each host over one shared
directory (`e2e.harness.fuse_datastore`; this kernel can host no iSCSI session, see docs/ha.md):
the VM's file disk is on it, and SIGSTOP of host1's bindfs stalls host1's path alone, as a dead
NFS server would. host1's agent's bounded read of the image times out, it
reports `file PATH` lost in its ClusterNode status, and the controller applies host1's policy:

- `warn`: a `StorageLost` Warning and nothing else; the path back, `StorageRestored`. An agent
  whose read is still blocked on the stalled mount exits on SIGTERM;
- `fence`: after `graceSeconds`, host1 is powered off through its BMC, and only then does the
  VM run on host2. The two-copies checker samples both hosts' qemu processes throughout;
- `fence` with the leading controller on host1 (a controller on each host; scenario 48 of the
  simulator): the leader powers off its own host and dies with it, host2's controller takes
  over, fences host1 again, and only then does the VM run on host2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Literal

import pytest

from controller.runtime.store import Store
from crds import ClusterNode, Event, VirtualMachine
from crds.clusternode import LostStoragePath, StorageLossPolicy
from crds.virtualmachine import Disk
from e2e.guest.build import GuestImage, ensure_guest_image
from e2e.guest.console import BOOTED_LINE
from e2e.harness import polling
from e2e.harness.chaos import (
    ChaosCluster,
    TwoCopiesChecker,
    guest_vm,
    ipmi_node,
    ipmi_secret,
    leader_host,
)
from e2e.harness.frozen import process_state
from e2e.harness.fuse_datastore import FuseDatastore
from e2e.harness.topology import every_host_online, lead_controllers_from

pytestmark = pytest.mark.slow

VICTIM, SURVIVOR = "host1", "host2"
DEADLINE = 150.0
"""Generous: two loaded cores, TCG guests, a 5 s check interval plus a 5 s read timeout."""
eventually = partial(polling.eventually, timeout=DEADLINE)
IMAGE_BYTES = 1 << 20


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[ChaosCluster]:
    """host1 and host2, with a controller on each host of `request.param` (default: host2)."""
    controller_hosts = getattr(request, "param", (SURVIVOR,))
    cluster = ChaosCluster((VICTIM, SURVIVOR), controller_hosts=controller_hosts)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def datastore(cluster: ChaosCluster) -> Iterator[FuseDatastore]:
    datastore = FuseDatastore(cluster.lab.root)
    try:
        for name in cluster.kvm_hosts:
            datastore.mount(cluster.host(name))
        yield datastore
    finally:
        datastore.unmount_all()  # before the hosts go: continued, unmounted, ended by PID


@dataclass
class StorageLab:
    cluster: ChaosCluster
    datastore: FuseDatastore
    store: Store
    checker: TwoCopiesChecker
    image: GuestImage

    async def nodes(self, action: Literal["warn", "fence"], grace: int) -> None:
        """Both ClusterNodes, fenced by IPMI, with storageLoss {action, graceSeconds: grace};
        once both agents are Online."""
        await self.store.create(ipmi_secret(self.cluster.bmc_password))
        for name in self.cluster.kvm_hosts:
            node = ipmi_node(self.cluster, name)
            node.spec.fencing.storage_loss = StorageLossPolicy(action=action, grace_seconds=grace)
            await self.store.create(node)
        await eventually(partial(every_host_online, self.cluster, self.store), "both Online")

    async def start_vm(self, name: str) -> str:
        """A VM whose disk is a file on the datastore, running on host1; the disk's path."""
        (self.datastore.backing / f"{name}.img").write_bytes(bytes(IMAGE_BYTES))
        disk = str(self.datastore.path / f"{name}.img")
        vm = guest_vm(name, self.image, [VICTIM, SURVIVOR])
        vm.spec.disks = [Disk(file=disk)]
        await self.store.create(vm)
        # Running as its agent reports it (libvirt's start returned: a start still under way
        # would block on the stalled mount) and booted (the guest kernel has read its disk).
        await eventually(partial(self.running_on, name, VICTIM), f"{name} Running on {VICTIM}")
        log = self.cluster.serial_log(name)
        await eventually(lambda: BOOTED_LINE in log.read_bytes(), f"{name} booted")
        assert self.checker.where(name) == (VICTIM,)
        for node in self.cluster.kvm_hosts:  # both agents have read the image once
            await eventually(partial(self.reachable, node), f"{node} reaching {disk}")
        return disk

    async def running_on(self, name: str, node: str) -> bool:
        vm = await self.store.get(VirtualMachine, name)
        return vm.status.state == "Running" and vm.status.node == node

    async def node(self, name: str) -> ClusterNode:
        return await self.store.get(ClusterNode, name)

    async def reachable(self, name: str) -> bool:
        condition = (await self.node(name)).status.condition("StorageReachable")
        return condition is not None and condition.status == "True"

    async def lost(self, name: str) -> list[LostStoragePath]:
        return (await self.node(name)).status.storage_lost

    async def events(self, involved: str, reason: str) -> list[Event]:
        return await polling.recorded_events(self.store, involved, reason)

    async def bmc_says_on(self, name: str) -> bool:
        """The host's power as its BMC reports it to fence_ipmilan (`action=status`)."""
        bmc = self.cluster.bmc(name)
        values = {
            "action": "status", "ip": bmc.address, "ipport": str(bmc.port),
            "username": bmc.user, "password": self.cluster.bmc_password, "lanplus": "1",
        }  # fmt: skip
        agent = await asyncio.create_subprocess_exec(
            "fence_ipmilan",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stdin = "".join(f"{key}={value}\n" for key, value in values.items()).encode()
        await asyncio.wait_for(agent.communicate(stdin), 60)
        assert agent.returncode in (0, 2), f"fence_ipmilan status exited {agent.returncode}"
        return agent.returncode == 0


@pytest.fixture
async def lab(cluster: ChaosCluster, datastore: FuseDatastore) -> AsyncIterator[StorageLab]:
    image = await asyncio.to_thread(ensure_guest_image)
    async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
        with TwoCopiesChecker(cluster) as checker:
            yield StorageLab(cluster, datastore, store, checker, image)
        assert checker.violations == [], checker.violations


async def test_action_warn_reports_the_stalled_datastore_and_moves_nothing(
    lab: StorageLab,
) -> None:
    await lab.nodes("warn", grace=1)
    disk = await lab.start_vm("vm-warn")
    qemu = lab.cluster.qemu_guests(VICTIM)["vm-warn"]

    lab.datastore.stall(VICTIM)
    lost = await eventually(partial(lab.lost, VICTIM), f"{VICTIM} reporting its path lost")
    assert [entry.path for entry in lost] == [f"file {disk}"]
    assert lost[0].message == f"no answer reading {disk} within 5 s"
    condition = (await lab.node(VICTIM)).status.condition("StorageReachable")
    assert condition is not None and (condition.status, condition.reason) == (
        "False",
        "StoragePathLost",
    )
    (warning,) = await lab.events(VICTIM, "StorageLost")
    assert warning.spec.type == "Warning"
    assert warning.spec.message == (
        f"{VICTIM} lost storage path file {disk} needed by vm-warn: "
        "only warned (storageLoss.action warn)"
    )

    # The agent's next look (5 s on) finds its read still blocked: lost for longer than the
    # 1 s grace, which `fence` would have acted on. Nothing is fenced, the VM stays.
    async def still_blocked() -> bool:
        entries = await lab.lost(VICTIM)
        return bool(entries) and "has been blocked for more than" in entries[0].message

    await eventually(still_blocked, f"{VICTIM} reporting the read still blocked")
    node = await lab.node(VICTIM)
    assert (node.status.health, node.status.fence) == ("Online", None)
    assert await lab.lost(SURVIVOR) == []
    assert lab.cluster.qemu_guests(VICTIM).get("vm-warn") == qemu
    assert lab.checker.where("vm-warn") == (VICTIM,)

    lab.datastore.resume(VICTIM)
    await eventually(partial(lab.reachable, VICTIM), f"{VICTIM} reaching its path again")
    assert await lab.lost(VICTIM) == []
    (restored,) = await lab.events(VICTIM, "StorageRestored")
    assert restored.spec.type == "Normal"
    assert lab.cluster.qemu_guests(VICTIM).get("vm-warn") == qemu
    assert await lab.bmc_says_on(VICTIM)

    # Stalled again, with the agent's read blocked in the kernel: it still exits on SIGTERM.
    lab.datastore.stall(VICTIM)
    await eventually(partial(lab.lost, VICTIM), f"{VICTIM} reporting its path lost again")
    agent = lab.cluster.agents.pop(VICTIM)
    os.kill(agent, signal.SIGTERM)
    status = await asyncio.to_thread(lab.cluster.host(VICTIM).wait_exit, agent, DEADLINE)
    assert status == 0
    assert process_state(lab.datastore.pid(VICTIM)) == "T"  # the mount was stalled throughout


async def test_action_fence_powers_the_host_off_before_the_vm_runs_elsewhere(
    lab: StorageLab,
) -> None:
    await lab.nodes("fence", grace=2)
    disk = await lab.start_vm("vm-fence")

    stalled, stalled_at = time.monotonic(), datetime.now(UTC)
    lab.datastore.stall(VICTIM)
    lost = await eventually(partial(lab.lost, VICTIM), f"{VICTIM} reporting its path lost")
    reported = time.monotonic()
    assert [entry.path for entry in lost] == [f"file {disk}"]
    await eventually(lambda: lab.checker.where("vm-fence") == (SURVIVOR,), "vm-fence on host2")
    running = lab.checker.first_seen("vm-fence", SURVIVOR, stalled)
    gone = lab.checker.last_seen("vm-fence", VICTIM)
    assert running is not None and gone is not None

    # Powered off by the BMC, recorded as confirmed, before the VM ran on host2.
    assert not await lab.bmc_says_on(VICTIM)
    node = await lab.node(VICTIM)
    assert node.status.health == "Fenced"
    fence = node.status.fence
    assert fence is not None and fence.how == "PowerOff" and fence.confirmed_at is not None
    running_at = stalled_at.timestamp() + (running - stalled)
    assert fence.confirmed_at.timestamp() <= running_at
    assert gone < running  # host1's qemu last seen alive before host2's first seen
    (node_lost,) = await lab.events(VICTIM, "NodeLost")
    assert f"storage path file {disk} lost" in node_lost.spec.message
    (fenced,) = await lab.events(VICTIM, "NodeFenced")
    (recovered,) = await lab.events("vm-fence", "VMRecovered")
    assert fenced.spec.first_timestamp <= recovered.spec.first_timestamp
    assert recovered.spec.message == f"running on {SURVIVOR}"
    assert lab.checker.violations == []

    confirmed = fence.confirmed_at.timestamp() - stalled_at.timestamp()
    print(
        f"storage loss, action fence, grace 2 s: stall -> reported lost {reported - stalled:.1f} s"
        f" -> host1's qemu gone {gone - stalled:.1f} s (fence confirmed between {confirmed:.1f}"
        f" and {confirmed + 1:.1f} s: whole seconds) -> running on host2 {running - stalled:.1f} s"
    )
    lab.datastore.resume(VICTIM)  # its launcher reaps the killed bindfs: host1 finishes dying


@pytest.mark.parametrize("cluster", [(VICTIM, SURVIVOR)], indirect=True, ids=["both-controllers"])
async def test_action_fence_on_the_leading_controllers_host_is_finished_by_the_standby(
    lab: StorageLab,
) -> None:
    await lab.nodes("fence", grace=2)
    assert await lead_controllers_from(lab.cluster, lab.store, [VICTIM]) == VICTIM
    await lab.start_vm("vm-leader")

    stalled, stalled_at = time.monotonic(), datetime.now(UTC)
    lab.datastore.stall(VICTIM)
    await eventually(lambda: lab.checker.where("vm-leader") == (SURVIVOR,), "vm-leader on host2")
    running = lab.checker.first_seen("vm-leader", SURVIVOR, stalled)
    gone = lab.checker.last_seen("vm-leader", VICTIM)
    assert running is not None and gone is not None

    # host1's controller led when the path was lost; host2's leads now, and host1 was powered
    # off and recorded as fenced before the VM ran on host2.
    assert await leader_host(lab.store) == SURVIVOR
    assert not await lab.bmc_says_on(VICTIM)
    node = await lab.node(VICTIM)
    assert node.status.health == "Fenced"
    fence = node.status.fence
    assert fence is not None and fence.how == "PowerOff" and fence.confirmed_at is not None
    assert fence.confirmed_at.timestamp() <= stalled_at.timestamp() + (running - stalled)
    assert gone < running
    (recovered,) = await lab.events("vm-leader", "VMRecovered")
    assert recovered.spec.message == f"running on {SURVIVOR}"
    assert lab.checker.violations == []
    lab.datastore.resume(VICTIM)  # its launcher reaps the killed bindfs: host1 finishes dying
