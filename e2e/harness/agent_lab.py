"""The agent lab of e2e/test_agent.py (and the fence and bench runs built on it): simulated hosts
each with its own libvirtd and a `kvmctl agent` process, a real etcd on the lab gateway, TCG
guests printing a counter, and the test process playing the elected controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import libvirt
import pytest

from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, VirtualMachine
from crds.clusternode import ClusterNodeSpec, NodeAddresses
from crds.virtualmachine import VirtualMachineSpec
from e2e.guest.build import KERNEL_CMDLINE, GuestImage, ensure_guest_image
from e2e.guest.console import BOOTED_LINE, read_ticks
from e2e.harness import polling
from e2e.harness.etcd import EtcdCluster
from e2e.harness.hosts import REPO_ROOT, SimulatedHost
from e2e.harness.lab import Lab
from e2e.harness.standin import StandInController

KVMCTL = str(Path(sys.executable).parent / "kvmctl")
PREFIX = "/kvmctl"
DEADLINE = 90.0
eventually = partial(polling.eventually, timeout=DEADLINE)
HOSTS = ("host-a", "host-b", "host-w")


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """Errors are raised as exceptions; do not also print them on stderr."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


class AgentLab:
    """A lab, its etcd and one `kvmctl agent` per host (host-w gets one per test)."""

    def __init__(self, lab: Lab, etcd: EtcdCluster, image: GuestImage) -> None:
        self.lab = lab
        self.etcd = etcd
        self.image = image
        self.serial_dir = lab.root / "serial"
        self.serial_dir.mkdir()
        self.agents: dict[str, int] = {}

    def agent_argv(self, node: str, *extra: str) -> list[str]:
        endpoints = ",".join(self.lab.host_etcd_endpoints(self.etcd))
        return [
            KVMCTL, "--etcd", endpoints, "--prefix", PREFIX, "agent", "--node", node,
            "--libvirt-uri", "qemu:///system", "--domain-type", "qemu",
            "--serial-log-dir", str(self.serial_dir), *extra,
        ]  # fmt: skip

    def start_agent(self, node: str, *extra: str) -> int:
        host = self.lab[node]
        pid = host.spawn(self.agent_argv(node, *extra), log_path=host.dir / "agent.log")
        self.agents[node] = pid
        return pid

    def stop_agent(self, node: str) -> int:
        """SIGTERM the agent (by its PID) and wait for it; its exit status."""
        pid = self.agents.pop(node)
        os.kill(pid, signal.SIGTERM)
        return self.lab[node].wait_exit(pid, 30.0)

    def serial_log(self, vm: str) -> Path:
        return self.serial_dir / f"{vm}.log"

    def host(self, name: str) -> SimulatedHost:
        return self.lab[name]

    async def kvmctl(self, *args: str) -> tuple[int, str, str]:
        """Run the `kvmctl` command against the lab's etcd: (exit code, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            KVMCTL,
            "--etcd",
            ",".join(self.etcd.endpoints),
            "--prefix",
            PREFIX,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), DEADLINE)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture(scope="module")
def agent_lab() -> Iterator[AgentLab]:
    image = ensure_guest_image()
    with Lab(list(HOSTS)) as lab:
        etcd = lab.start_etcd()
        agents = AgentLab(lab, etcd, image)
        asyncio.run(_create_nodes(etcd.endpoints, lab))
        for name in ("host-a", "host-b"):
            agents.start_agent(name)
        yield agents
        for name in list(agents.agents):
            with contextlib.suppress(ProcessLookupError, OSError):
                agents.stop_agent(name)


async def _create_nodes(endpoints: list[str], lab: Lab) -> None:
    async with Store(endpoints, prefix=PREFIX) as store:
        for name in HOSTS:
            host = lab[name]
            node = ClusterNode(
                metadata=ObjectMeta(name=name),
                spec=ClusterNodeSpec(
                    addresses=NodeAddresses(cluster=ip_address(host.address)),
                    libvirt_uri=host.libvirt_tcp_uri,
                ),
            )
            node.spec.fencing.self_fence = name == "host-w"
            await store.create(node)


class Controller(StandInController):
    """The elected controller's part in these tests: placements and the migration controller."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, "e2e-test", migrations=True)


@pytest.fixture
async def controller(agent_lab: AgentLab) -> AsyncIterator[Controller]:
    async with Store(agent_lab.etcd.endpoints, prefix=PREFIX) as store:
        running = Controller(store)
        await running.lead()
        try:
            yield running
        finally:
            await running.stop_leading()


def guest_vm(name: str, image: GuestImage, **spec: Any) -> VirtualMachine:
    fields: dict[str, Any] = {
        "memoryMiB": 96,
        "boot": {
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": KERNEL_CMDLINE,
        },
        "shutdownTimeoutSeconds": 5,
        **spec,
    }
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec.model_validate(fields)
    )


def boots(agent_lab: AgentLab, vm: str) -> int:
    """How many times the guest booted (its serial log is appended to across boots)."""
    try:
        return agent_lab.serial_log(vm).read_bytes().count(BOOTED_LINE)
    except FileNotFoundError:
        return 0


async def running_on(controller: Controller, name: str, node: str) -> None:
    async def running() -> bool:
        vm = await controller.vm(name)
        return vm.status.state == "Running" and vm.status.node == node

    await eventually(running, f"{name} Running on {node}")


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(2)}"


async def booted(agent_lab: AgentLab, vm: str, above: int = 0, timeout: float = DEADLINE) -> int:
    """Wait until the guest's counter passes `above`; the latest value."""

    def latest() -> int | None:
        ticks = read_ticks(agent_lab.serial_log(vm))
        return ticks[-1] if ticks and ticks[-1] > above else None

    value: int = await eventually(latest, f"{vm} counting past {above}", timeout=timeout)
    return value


async def apply_running(
    agent_lab: AgentLab, controller: Controller, name: str, node: str, **spec: Any
) -> int:
    """Create the VM placed on `node`; wait until it runs and counts. Its qemu PID."""
    await controller.store.create(guest_vm(name, agent_lab.image, **spec))
    await controller.place(name, node)
    host = agent_lab.host(node)
    pid: int = await eventually(lambda: host.qemu_guests().get(name), f"qemu of {name} on {node}")
    await running_on(controller, name, node)
    await booted(agent_lab, name)
    return pid


async def delete_vm(controller: Controller, name: str) -> None:
    await controller.store.delete("VirtualMachine", name)

    async def gone() -> bool:
        return await controller.store.try_get("VirtualMachine", name) is None

    await eventually(gone, f"{name} deleted")
