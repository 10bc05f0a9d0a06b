"""Host agent benchmarks (issue 4): apply -> qemu running, live migration, 100 VMs converging.

Run: `python -m bench.agent_bench [--runs N]` as root. It builds a lab of two simulated hosts
(e2e/harness/hosts.py: own namespaces and libvirtd each, a `kvmctl agent` process inside each),
starts an etcd on the lab gateway, and plays the elected controller in-process (a real LeaderElector
writing placements with its token and running the migration controller). Prints figures and method;
nothing is asserted (numbers live in docs/benchmarks.md).

1. apply -> qemu: from the VM's create (placement written right after, as the controller would)
   to its qemu process existing on the host (polled every 10 ms); guest boot is not included.
2. live migration: wall time of a `kvmctl migrate VM --to NODE --wait` process (start-up, the
   request, scheduling, the libvirt migration, the placement switch, the exit) against a raw
   libvirt peer-to-peer migration (`migrateToURI3`, the flags the driver uses) of an identical
   guest (same kernel, initrd, memory) that kvmctl does not own, between the same hosts, the two
   kinds alternating in one run.
3. 100 VMs: one in-process agent on libvirt's test driver and the bench's etcd; from creating
   and placing 100 VMs to all of them reported Running.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from ipaddress import ip_address
from pathlib import Path

import libvirt

from controller.agent import Agent, AgentSettings
from controller.cli.vm import migration_name
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, VirtualMachine, VirtualMachineMigration
from crds.clusternode import ClusterNodeSpec, NodeAddresses
from crds.migration import PLACEMENT_SWITCHED, VirtualMachineMigrationSpec
from e2e.guest.build import ensure_guest_image
from e2e.guest.console import read_ticks
from e2e.harness.agent_lab import (
    PREFIX,
    AgentLab,
    Controller,
    eventually,
    guest_vm,
)
from e2e.harness.hosts import SimulatedHost
from e2e.harness.lab import Lab
from e2e.harness.private_host import host_uri
from reconcilers.virtualmachine import DomainSettings

MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)


def _quiet(_context: object, _error: object) -> None:
    return None


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    return (
        f"median {statistics.median(ordered):.3f} s, min {ordered[0]:.3f} s, "
        f"max {ordered[-1]:.3f} s (n={len(ordered)})"
    )


async def wait_qemu(host: SimulatedHost, name: str) -> None:
    while name not in host.qemu_guests():
        await asyncio.sleep(0.01)


async def bench_apply_to_qemu(
    agent_lab: AgentLab, controller: Controller, runs: int
) -> list[float]:
    host = agent_lab.host("host-a")
    times = []
    for _ in range(runs):
        name = f"apply-{secrets.token_hex(2)}"
        started = time.perf_counter()
        await controller.store.create(guest_vm(name, agent_lab.image))
        await controller.place(name, "host-a")
        await asyncio.wait_for(wait_qemu(host, name), 60)
        times.append(time.perf_counter() - started)
        await controller.store.delete("VirtualMachine", name)
        await eventually(lambda: name not in host.qemu_guests(), f"{name} deleted")  # noqa: B023
    return times


async def kvmctl_migrate(agent_lab: AgentLab, vm: str, target: str) -> float:
    started = time.perf_counter()
    code, _, stderr = await agent_lab.kvmctl("migrate", vm, "--to", target, "--wait")
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"kvmctl migrate failed: {stderr[-500:]}")
    return elapsed


async def inprocess_migrate(store: Store, vm: str, target: str) -> dict[str, float]:
    """Create the request in this process and time each phase from the create: the same path
    as `kvmctl migrate --wait` without the CLI's start-up."""
    name = migration_name(vm)
    revision = await store.revision()
    started = time.perf_counter()
    request = VirtualMachineMigration(
        metadata=ObjectMeta(name=name),
        spec=VirtualMachineMigrationSpec(vm=vm, target_node=target),
    )
    await store.create(request)
    seen: dict[str, float] = {}
    async for event in store.watch("VirtualMachineMigration", revision + 1):
        migration = event.object
        if migration.metadata.name != name or not isinstance(migration, VirtualMachineMigration):
            continue
        phase = migration.status.phase
        seen.setdefault(phase, time.perf_counter() - started)
        if phase == "Failed":
            raise RuntimeError(f"migration {name} failed: {migration.status.message}")
        if migration.status.condition(PLACEMENT_SWITCHED) is not None:
            seen["Switched"] = time.perf_counter() - started
            return seen
    raise RuntimeError("the watch ended")


def raw_migrate(name: str, source: SimulatedHost, target: SimulatedHost) -> float:
    connection = libvirt.open(source.libvirt_uri)
    try:
        domain = connection.lookupByName(name)
        domain.migrateSetMaxDowntime(300, 0)
        params = {libvirt.VIR_MIGRATE_PARAM_URI: target.migration_uri}
        started = time.perf_counter()
        domain.migrateToURI3(target.libvirt_tcp_uri, params, MIGRATE_FLAGS)
        return time.perf_counter() - started
    finally:
        connection.close()


def start_raw_guest(agent_lab: AgentLab, host: SimulatedHost) -> str:
    name = f"raw-{secrets.token_hex(2)}"
    serial = agent_lab.serial_dir / f"{name}.log"
    connection = libvirt.open(host.libvirt_uri)
    try:
        connection.defineXML(agent_lab.image.domain_xml(name, serial)).create()
    finally:
        connection.close()
    return name


async def bench_migration(
    agent_lab: AgentLab, controller: Controller, runs: int
) -> tuple[list[float], list[float], list[dict[str, float]]]:
    hosts = {"host-a": agent_lab.host("host-a"), "host-b": agent_lab.host("host-b")}
    managed = f"mig-{secrets.token_hex(2)}"
    await controller.store.create(guest_vm(managed, agent_lab.image))
    await controller.place(managed, "host-a")
    raw = start_raw_guest(agent_lab, hosts["host-a"])
    for name in (managed, raw):
        log = agent_lab.serial_dir / f"{name}.log"
        await eventually(lambda: len(read_ticks(log)) > 5, f"{name} counting")  # noqa: B023

    async def running_on(node: str) -> bool:
        vm = await controller.store.get("VirtualMachine", managed)
        assert isinstance(vm, VirtualMachine)
        return vm.status.node == node and vm.status.state == "Running"

    await eventually(lambda: running_on("host-a"), "managed guest running")
    kvmctl_times: list[float] = []
    raw_times: list[float] = []
    phases: list[dict[str, float]] = []
    where = "host-a"
    for run in range(2 * runs):
        there = "host-b" if where == "host-a" else "host-a"
        if run % 2 == 0:
            kvmctl_times.append(await kvmctl_migrate(agent_lab, managed, there))
        else:
            phases.append(await inprocess_migrate(controller.store, managed, there))
        await eventually(lambda: running_on(there), f"{managed} adopted on {there}")  # noqa: B023
        raw_times.append(await asyncio.to_thread(raw_migrate, raw, hosts[where], hosts[there]))
        where = there
    return kvmctl_times, raw_times, phases


async def bench_converge(endpoints: list[str], count: int) -> tuple[float, float]:
    """Seconds from the first create to all `count` VMs Running, and the same per VM."""
    with tempfile.TemporaryDirectory() as folder:
        async with Store(endpoints, prefix=f"/bench-{secrets.token_hex(3)}") as store:
            controller = Controller(store)
            await controller.lead()
            await store.create(
                ClusterNode(
                    metadata=ObjectMeta(name="host1"),
                    spec=ClusterNodeSpec(addresses=NodeAddresses(cluster=ip_address("127.0.0.1"))),
                )
            )
            settings = AgentSettings(
                node="host1",
                libvirt_uri=host_uri(Path(folder), "host1"),
                domain=DomainSettings("qemu", Path(folder)),
            )
            agent = Agent(store, settings)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await eventually(agent.ready.is_set, "agent ready")
            started = time.perf_counter()
            names = [f"vm-{i:03d}" for i in range(count)]
            image = ensure_guest_image()
            for name in names:
                await store.create(guest_vm(name, image))
                await controller.place(name, "host1")

            async def all_running() -> bool:
                objects, _ = await store.list_objects("VirtualMachine")
                return sum(1 for o in objects if o.status.state == "Running") == count

            await eventually(all_running, "all running", timeout=300)
            elapsed = time.perf_counter() - started
            stop.set()
            await task
            await controller.stop_leading()
            return elapsed, elapsed / count


async def run(runs: int) -> None:
    libvirt.registerErrorHandler(_quiet, None)
    image = ensure_guest_image()
    # The lab drives pyroute2's synchronous API, which runs an event loop of its own: keep it
    # in a thread, off this one.
    lab = Lab(["host-a", "host-b"])
    await asyncio.to_thread(lab.start)
    try:
        etcd = await asyncio.to_thread(lab.start_etcd)
        agent_lab = AgentLab(lab, etcd, image)
        async with Store(etcd.endpoints, prefix=PREFIX) as store:
            await create_nodes(store, lab)
            for name in lab.hosts:
                agent_lab.start_agent(name)
            controller = Controller(store)
            await controller.lead()
            try:
                apply_times = await bench_apply_to_qemu(agent_lab, controller, runs)
                kvmctl_times, raw_times, phases = await bench_migration(agent_lab, controller, runs)
            finally:
                await controller.stop_leading()
        converge, per_vm = await bench_converge(etcd.endpoints, 100)
    finally:
        await asyncio.to_thread(lab.cleanup)
    overhead = statistics.median(kvmctl_times) - statistics.median(raw_times)
    print("apply -> qemu process running:", summary(apply_times))
    print("kvmctl migrate --wait:         ", summary(kvmctl_times))
    print("raw libvirt migration:          ", summary(raw_times))
    print(f"migration overhead (medians):   {overhead:.3f} s")
    for phase in ("Scheduled", "Running", "Succeeded", "Switched"):
        offsets = [timeline[phase] for timeline in phases if phase in timeline]
        print(f"  in-process request -> {phase + ':':<11}{summary(offsets)}")
    per_vm_ms = per_vm * 1000
    print(
        f"100 VMs on the test driver:     {converge:.2f} s to all Running ({per_vm_ms:.1f} ms/VM)"
    )


async def create_nodes(store: Store, lab: Lab) -> None:
    for name, host in lab.hosts.items():
        spec = ClusterNodeSpec(
            addresses=NodeAddresses(cluster=ip_address(host.address)),
            libvirt_uri=host.libvirt_tcp_uri,
        )
        await store.create(ClusterNode(metadata=ObjectMeta(name=name), spec=spec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each measure")
    args = parser.parse_args(argv)
    asyncio.run(run(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
