"""Host agents in-process on libvirt's test driver, a stand-in elected controller writing their
placements, and the VirtualMachines they run (tests/test_vm_reconciler.py and the fence tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from controller.agent import Agent, AgentSettings
from controller.runtime.heartbeat import HeartbeatTiming
from controller.runtime.peers import PeerSettings
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, VirtualMachine
from crds.clusternode import ClusterNodeSpec, NodeAddresses
from crds.virtualmachine import RestartPolicy, VirtualMachineSpec
from e2e.harness.polling import eventually
from e2e.harness.private_host import host_uri
from e2e.harness.standin import StandInController
from reconcilers.drivers.libvirt import DomainState
from reconcilers.lvm_lock import LvmSettings
from reconcilers.virtualmachine import DomainSettings

DEADLINE = 30.0


class Cluster(StandInController):
    """Agents on test-driver hosts, and a controller stand-in that writes placements."""

    def __init__(self, store: Store, tmp_path: Path) -> None:
        super().__init__(store, "test")
        self.tmp_path = tmp_path
        self.agents: dict[str, tuple[Agent, asyncio.Event, asyncio.Task[None]]] = {}
        self.node_count = 0

    async def add_node(self, name: str, self_fence: bool = False, peer_uri: bool = True) -> None:
        """A ClusterNode; with `peer_uri`, a libvirtUri peers could migrate to (the agents'
        own test:// URIs are local-only, so they are not reported)."""
        self.node_count += 1
        index = self.node_count
        node = ClusterNode(
            metadata=ObjectMeta(name=name),
            spec=ClusterNodeSpec(
                addresses=NodeAddresses(cluster=ip_address(f"127.0.0.{index}")),
                libvirt_uri=f"qemu+tcp://127.0.0.{index}/system" if peer_uri else None,
            ),
        )
        node.spec.fencing.self_fence = self_fence
        await self.store.create(node)

    async def start_agent(
        self,
        name: str,
        uri: str | None = None,
        timing: HeartbeatTiming | None = None,
        lvm: LvmSettings | None = None,
        direct_heartbeats: bool = True,
        resync_period: float = 30.0,
        storage_check_interval: float | None = None,
        vm_workers: int = AgentSettings.vm_workers,
        status_interval: float = AgentSettings.status_interval,
    ) -> Agent:
        """Start `name`'s agent (on a private 4-CPU test host unless `uri` names another) and
        wait until it is ready; without `direct_heartbeats` it sends none to its peers.

        The storage-path watch is off unless `storage_check_interval` is given: the disks of
        libvirt's test driver are names, not files, so every path would read as lost."""
        settings = AgentSettings(
            node=name,
            libvirt_uri=uri or host_uri(self.tmp_path, name),
            domain=DomainSettings("qemu", self.tmp_path / "serial", lvm),
            heartbeat=timing or HeartbeatTiming(),
            resync_period=resync_period,
            peers=PeerSettings() if direct_heartbeats else None,
            storage_check_interval=storage_check_interval,
            vm_workers=vm_workers,
            status_interval=status_interval,
        )
        agent = Agent(self.store, settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        self.agents[name] = (agent, stop, task)
        await eventually(lambda: agent.ready.is_set() or task.done(), f"agent {name} ready")
        if task.done():
            task.result()
        return agent

    async def stop_agent(self, name: str) -> None:
        _, stop, task = self.agents.pop(name)
        stop.set()
        await asyncio.wait_for(task, DEADLINE)

    async def close(self) -> None:
        for name in list(self.agents):
            with contextlib.suppress(Exception):
                await self.stop_agent(name)
        await self.stop_leading()


@pytest.fixture
async def cluster(store: Store, tmp_path: Path) -> AsyncIterator[Cluster]:
    lab = Cluster(store, tmp_path)
    await lab.lead()
    try:
        yield lab
    finally:
        await lab.close()


def vm_object(name: str, **spec: Any) -> VirtualMachine:
    fields: dict[str, Any] = {
        "memoryMiB": 128,
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"},
        "disks": [{"file": f"/var/lib/kvmctl/{name}.img"}],
        **spec,
    }
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec.model_validate(fields)
    )


async def domain_state(agent: Agent, name: str) -> DomainState | None:
    assert agent.host is not None
    info = await agent.host.lookup(name)
    return None if info is None else info.state


async def running_vm(cluster: Cluster, name: str, node: str, **spec: Any) -> VirtualMachine:
    await cluster.store.create(vm_object(name, **spec))
    await cluster.place(name, node)

    async def running() -> VirtualMachine | None:
        vm = await cluster.vm(name)
        return vm if vm.status.state == "Running" and vm.status.node == node else None

    vm: VirtualMachine = await eventually(running, f"{name} running on {node}")
    return vm


async def agent_with_watchdog_vm(cluster: Cluster, action: str) -> Agent:
    """host1's agent running vm1 with a watchdog of `action` and one restart allowed in 600 s."""
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    policy = RestartPolicy(max_restarts=1, window_seconds=600)
    await running_vm(
        cluster,
        "vm1",
        "host1",
        health={"watchdog": {"action": action}},
        restartPolicy=policy.model_dump(by_alias=True),
    )
    assert agent.host is not None and agent.vm_queue is not None
    return agent
