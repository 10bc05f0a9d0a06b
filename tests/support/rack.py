"""A rack on real parts, for tests/test_rack_failover.py and bench/rack_bench.py: large hosts
whose agents run in-process on libvirt's test driver, small VMs each preferring one host, one
host (the victim) with a fence_dummy device whose power is cut by stopping its agent, and a
checker that no VM runs on two hosts at once, nor elsewhere before the victim is fenced."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.agent import AgentSettings
from controller.ha.agent_side import heartbeat_timing
from controller.ha.environment import HaTimings
from controller.runtime.store import AlreadyExists, Store, Unavailable
from crds import ClusterNode, ObjectMeta, Secret, VirtualMachine
from crds.secret import SecretSpec
from e2e.harness.polling import eventually
from e2e.harness.private_host import host_uri
from tests.support.agents import Cluster, vm_object
from tests.support.ha import dummy_fencing, get_node, node_object

RACK_TIMINGS = HaTimings(
    lease_ttl=5.0,
    renew_interval=1.0,
    self_fence_margin=1.0,
    fence_retry_initial=0.5,
    fence_retry_max=2.0,
)
"""Leases of 5 s: dozens of agents share one event loop (and the test machine), so a renewal
may be late by a second without the engine taking a live host for lost."""
HOST_CPUS = 256
HOST_MEMORY_MIB = 64 * 1024
"""Each test host holds 256 one-vcpu 64 MiB VMs."""
SAMPLE_INTERVAL = 0.1
CREATE_BATCH = 50
CREATE_ATTEMPTS = 5
ONLINE_DEADLINE = 60.0


def host_name(index: int) -> str:
    return f"h{index:02d}"


class Rack:
    """`hosts` nodes with their agents; host 0 is the victim, fenced by fence_dummy."""

    def __init__(self, store: Store, directory: Path, hosts: int) -> None:
        self.store = store
        self.cluster = Cluster(store, directory)
        self.hosts = [host_name(i) for i in range(hosts)]
        self.victim = self.hosts[0]
        self.power = directory / "victim.power"
        """fence_dummy's status file for the victim: "on" until it is fenced."""
        self.victim_vms: list[str] = []
        self.vm_count = 0

    async def start_hosts(self) -> None:
        """Every host's ClusterNode and agent, ready."""
        await self.create_nodes()
        for name in self.hosts:
            await start_rack_agent(self.cluster, name)
        await eventually(self.all_online, "every host Online", timeout=ONLINE_DEADLINE)

    async def create_nodes(self) -> None:
        """The ClusterNodes, the victim's with its fence device (power "on")."""
        self.power.write_text("on")
        secret = Secret(
            metadata=ObjectMeta(name="fence-victim", labels={"kvmctl.io/node": self.victim}),
            spec=SecretSpec(data={"file": str(self.power)}),
        )
        await self.store.create(secret)
        parameters = {"status_file": {"name": "fence-victim", "key": "file"}}
        fencing = dummy_fencing(secretParameters=parameters)
        await self.store.create(node_object(self.victim, fencing))
        for name in self.hosts[1:]:
            await self.store.create(node_object(name))

    async def create_vms(self, on_victim: int, elsewhere: int, rate: float | None = None) -> None:
        """`on_victim` VMs preferring the victim, `elsewhere` spread over the other hosts; with
        `rate`, no more than that many VMs a second (an administrator's apply, paced)."""
        others = self.hosts[1:]
        wanted = [(f"v{i:04d}", self.victim) for i in range(on_victim)]
        wanted += [(f"w{i:04d}", others[i % len(others)]) for i in range(elsewhere)]
        loop = asyncio.get_running_loop()
        began = loop.time()
        batch_size = CREATE_BATCH if rate is None else max(1, min(CREATE_BATCH, int(rate)))
        for start in range(0, len(wanted), batch_size):
            if rate is not None:
                await asyncio.sleep(max(0.0, began + start / rate - loop.time()))
            batch = wanted[start : start + batch_size]
            await asyncio.gather(*(self._create(rack_vm(n, h)) for n, h in batch))
        self.victim_vms = [name for name, _ in wanted[:on_victim]]
        self.vm_count = len(wanted)

    async def _create(self, vm: VirtualMachine) -> None:
        """Create `vm`, again after a request that got no answer in time (a loaded machine).
        The rack's names are new: AlreadyExists means that an unanswered attempt (ours, or the
        etcd client's own retry on another member) was carried out."""
        for attempt in range(CREATE_ATTEMPTS):
            try:
                await self.store.create(vm)
                return
            except AlreadyExists:
                return
            except Unavailable:
                if attempt == CREATE_ATTEMPTS - 1:
                    raise

    async def all_online(self) -> bool:
        """Whether the controller has every host Online (so VMs go to the host they prefer)."""
        nodes = await self._listing("ClusterNode")
        online = [n for n in nodes if isinstance(n, ClusterNode) and n.status.health == "Online"]
        return len(online) == len(self.hosts)

    async def all_running(self) -> list[VirtualMachine] | None:
        """Every VM, when each runs where it is placed (else None)."""
        vms = await self._listing("VirtualMachine")
        running = [vm for vm in vms if isinstance(vm, VirtualMachine) and runs_as_placed(vm)]
        return running if len(running) == self.vm_count else None

    async def _listing(self, kind: str) -> list[object]:
        """Every object of `kind`; none when etcd did not answer in time (a loaded machine:
        the caller polls again)."""
        try:
            objects, _ = await self.store.list_objects(kind)
        except Unavailable:
            return []
        return list(objects)

    async def victims_at_home(self) -> bool:
        """Whether every one of the victim's VMs still runs there (a loaded machine may have
        had the victim's lease lapse, and its VMs recovered elsewhere, before the cut)."""
        vms = await self._listing("VirtualMachine")
        home = [
            vm
            for vm in vms
            if isinstance(vm, VirtualMachine)
            and vm.metadata.name in self.victim_vms
            and runs_as_placed(vm)
            and vm.status.node == self.victim
        ]
        return len(home) == len(self.victim_vms)

    async def victims_moved(self) -> list[VirtualMachine] | None:
        """The victim's VMs, once every one runs as placed on another host (else None)."""
        vms = await self.all_running()
        if vms is None:
            return None
        moved = [vm for vm in vms if vm.metadata.name in self.victim_vms]
        return moved if all(vm.status.node != self.victim for vm in moved) else None

    async def cut_power(self) -> None:
        """The victim's agent stops (its lease lapses; its test host, and domains, go)."""
        await self.cluster.stop_agent(self.victim)

    async def close(self) -> None:
        await self.cluster.close()


async def start_rack_agent(
    cluster: Cluster,
    name: str,
    resync_period: float = 30.0,
    vm_workers: int = AgentSettings.vm_workers,
) -> None:
    """`name`'s agent on a large private test host, without direct heartbeats."""
    uri = host_uri(cluster.tmp_path, name, HOST_CPUS, HOST_MEMORY_MIB)
    timing = heartbeat_timing(RACK_TIMINGS)
    await cluster.start_agent(
        name,
        uri,
        timing,
        direct_heartbeats=False,
        resync_period=resync_period,
        vm_workers=vm_workers,
    )


def rack_vm(name: str, host: str) -> VirtualMachine:
    """A one-vcpu 64 MiB VM preferring `host` (any other will do)."""
    domain = {"ordered": True, "nodes": [{"name": host}]}
    return vm_object(name, memoryMiB=64, failoverDomain=domain)


def runs_as_placed(vm: VirtualMachine) -> bool:
    placement = vm.status.placement
    return (
        placement is not None and vm.status.state == "Running" and vm.status.node == placement.node
    )


class FailoverChecker:
    """Samples the domains with a process of every live host every `interval` s (one listing
    per host, no XML read); a violation is a VM running on two hosts, or one of the victim's
    running elsewhere while the victim's node is not yet recorded Fenced (the domains are
    sampled first, the node read after)."""

    def __init__(self, rack: Rack, interval: float = SAMPLE_INTERVAL) -> None:
        self.rack = rack
        self.interval = interval
        self.violations: list[str] = []
        self.samples = 0

    async def sample(self) -> None:
        seen: dict[str, str] = {}
        for name, (agent, _, _) in list(self.rack.cluster.agents.items()):
            host = agent.host
            if host is None:
                continue
            for vm in await host.active_domain_names():  # a rack domain is named as its VM
                if vm in seen:
                    self.violations.append(f"{vm} runs on {seen[vm]} and {name}")
                seen[vm] = name
        victims = set(self.rack.victim_vms)
        moved = sorted(
            vm for vm, host in seen.items() if vm in victims and host != self.rack.victim
        )
        if moved:
            health = (await get_node(self.rack.store, self.rack.victim)).status.health
            if health != "Fenced":
                self.violations.append(f"{moved[0]} runs on {seen[moved[0]]}; victim is {health}")
        self.samples += 1

    async def run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)
