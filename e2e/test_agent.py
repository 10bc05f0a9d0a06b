"""The host agent on real parts: `kvmctl agent` processes inside simulated hosts, each with its
own libvirtd, a real etcd on the lab gateway, TCG guests printing a counter.

The test process plays the elected controller: a real LeaderElector writes placements with its
fencing token and runs the migration controller (`controller/migrations.py`) while it leads.
One lab (three hosts) serves the whole module; every test uses its own VM names.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import libvirt
import pytest

from controller.apply import apply_one
from controller.runtime import layout_keys
from crds import VirtualMachine
from e2e.guest.console import read_ticks, tick_gaps
from e2e.harness.agent_lab import (
    PREFIX,
    AgentLab,
    Controller,
    apply_running,
    booted,
    boots,
    delete_vm,
    eventually,
    running_on,
    unique,
)
from e2e.harness.hosts import SimulatedHost


def defined_on(host: SimulatedHost, name: str) -> bool:
    connection = libvirt.open(host.libvirt_uri)
    try:
        return name in [domain.name() for domain in connection.listAllDomains(0)]
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # its setup starts agent_lab: a first run downloads the guest kernel
async def test_guest_boots_stops_restarts_after_a_crash_and_is_deleted(
    agent_lab: AgentLab, controller: Controller
) -> None:
    name = unique("life")
    host = agent_lab.host("host-a")
    await apply_running(agent_lab, controller, name, "host-a")
    assert agent_lab.host("host-b").qemu_guests().get(name) is None

    # Stop: the guest powers off (ACPI) or is destroyed after the timeout.
    vm = await controller.vm(name)
    vm.spec.run_state = "stopped"
    await apply_one(controller.store, vm)
    await eventually(lambda: name not in host.qemu_guests(), f"qemu of {name} gone")

    async def stopped() -> bool:
        return (await controller.vm(name)).status.state == "Stopped"

    await eventually(stopped, f"{name} Stopped")
    assert defined_on(host, name)  # kept defined for the next start

    # Start again, then crash it: kill -9 of qemu, by PID.
    vm = await controller.vm(name)
    vm.spec.run_state = "started"
    await apply_one(controller.store, vm)
    await eventually(lambda: boots(agent_lab, name) == 2, f"{name} booted again")
    pid = host.qemu_guests()[name]
    await running_on(controller, name, "host-a")
    os.kill(pid, signal.SIGKILL)

    def restarted() -> int | None:
        new = host.qemu_guests().get(name)
        return new if new is not None and new != pid else None

    await eventually(restarted, f"{name} restarted after the crash", timeout=30)
    await eventually(lambda: boots(agent_lab, name) == 3, f"{name} booted after the crash")

    async def counted() -> VirtualMachine | None:
        current = await controller.vm(name)
        return current if len(current.status.restarts) == 1 else None

    await eventually(counted, "the restart recorded in status")
    assert await controller.events(name, "VMRestarted")

    # Delete: destroyed, undefined, the finalizer removed by the agent.
    await delete_vm(controller, name)
    assert name not in host.qemu_guests()
    assert not defined_on(host, name)


@pytest.mark.slow
async def test_agent_restart_adopts_running_guests(
    agent_lab: AgentLab, controller: Controller
) -> None:
    name = unique("adopt")
    pid = await apply_running(agent_lab, controller, name, "host-a")
    try:
        assert agent_lab.stop_agent("host-a") == 0  # SIGTERM: a clean stop
        assert agent_lab.host("host-a").qemu_guests().get(name) == pid  # the guest keeps running
        agent_lab.start_agent("host-a")

        async def adopted() -> bool:
            node = await controller.store.get("ClusterNode", "host-a")
            ready = node.status.condition("AgentReady")
            return ready is not None and ready.status == "True"

        await eventually(adopted, "agent of host-a back")
        ticks = await booted(agent_lab, name, above=max(read_ticks(agent_lab.serial_log(name))))
        assert agent_lab.host("host-a").qemu_guests().get(name) == pid  # adopted, not restarted
        assert ticks > 0
        vm = await controller.vm(name)
        assert vm.status.restarts == [] and vm.status.state == "Running"
    finally:
        if "host-a" not in agent_lab.agents:
            agent_lab.start_agent("host-a")
        await delete_vm(controller, name)


@pytest.mark.slow
async def test_live_migration_keeps_the_guest_counting(
    agent_lab: AgentLab, controller: Controller
) -> None:
    name = unique("move")
    source, target = agent_lab.host("host-a"), agent_lab.host("host-b")
    await apply_running(agent_lab, controller, name, "host-a")
    await booted(agent_lab, name, above=10)

    code, out, err = await agent_lab.kvmctl("migrate", name, "--to", "host-b", "--wait")

    assert code == 0, f"stdout: {out}\nstderr: {err}"
    assert "100%" in err and f"{name} migrated to host-b" in out
    assert name in target.qemu_guests() and name not in source.qemu_guests()
    vm = await controller.vm(name)
    assert vm.status.placement is not None and vm.status.placement.node == "host-b"
    assert vm.status.placement.token == controller.token

    async def running_on_target() -> bool:
        current = await controller.vm(name)
        return current.status.node == "host-b" and current.status.state == "Running"

    await eventually(running_on_target, f"{name} adopted by host-b")
    latest = max(read_ticks(agent_lab.serial_log(name)))
    await booted(agent_lab, name, above=latest + 10)
    ticks = read_ticks(agent_lab.serial_log(name))
    assert tick_gaps(ticks) == [], "the counter has a gap: the guest rebooted or lost time"
    assert not defined_on(source, name)
    await asyncio.sleep(1.0)  # neither agent may touch it now
    assert name in target.qemu_guests() and name not in source.qemu_guests()
    await delete_vm(controller, name)
    assert not defined_on(target, name)


@pytest.mark.slow
async def test_migration_to_a_cut_off_node_fails_and_the_guest_stays_up(
    agent_lab: AgentLab, controller: Controller
) -> None:
    name = unique("stay")
    source, target = agent_lab.host("host-a"), agent_lab.host("host-b")
    pid = await apply_running(agent_lab, controller, name, "host-a")
    # A fresh ARP entry for the target makes the source's TCP connect hang (no "no route to
    # host"): the agent must still give up, through the driver's stall timeout.
    touch = (
        "import socket, sys\n"
        "try: socket.create_connection((sys.argv[1], 9), 5)\n"
        "except OSError: pass"
    )
    knock = source.spawn([sys.executable, "-c", touch, target.address])
    assert await asyncio.to_thread(source.wait_exit, knock, 30) == 0
    # pyroute2's synchronous IPRoute runs its own event loop: keep it off this one.
    await asyncio.to_thread(target.cut_network)
    try:
        code, out, err = await agent_lab.kvmctl("migrate", name, "--to", "host-b", "--wait")
        assert code == 1, f"stdout: {out}\nstderr: {err}"
        assert "failed" in err
        assert await controller.events(name, "MigrationFailed")  # the source agent tried
        assert source.qemu_guests().get(name) == pid
        latest = max(read_ticks(agent_lab.serial_log(name)))
        await booted(agent_lab, name, above=latest + 5)
        assert tick_gaps(read_ticks(agent_lab.serial_log(name))) == []
        vm = await controller.vm(name)
        assert vm.status.placement is not None and vm.status.placement.node == "host-a"
    finally:
        await asyncio.to_thread(target.restore_network)
    assert name not in target.qemu_guests()
    await delete_vm(controller, name)


@pytest.mark.slow
async def test_cut_off_self_fencing_node_destroys_its_guests_before_its_lease_expires(
    agent_lab: AgentLab, controller: Controller
) -> None:
    """host-w relies on self-fencing (spec.fencing.selfFence); host-a does not."""
    fencing, keeping = unique("fenced"), unique("kept")
    host_w, host_a = agent_lab.host("host-w"), agent_lab.host("host-a")
    agent_lab.start_agent("host-w")
    try:
        await apply_running(agent_lab, controller, fencing, "host-w")
        await apply_running(agent_lab, controller, keeping, "host-a")
        await asyncio.to_thread(host_w.cut_network)
        try:
            await eventually(lambda: fencing not in host_w.qemu_guests(), "self-fence", timeout=30)
        finally:
            await asyncio.to_thread(host_w.restore_network)
        assert keeping in host_a.qemu_guests()

        # Back on the network, and still placed there: the agent starts it again.
        await eventually(lambda: fencing in host_w.qemu_guests(), "restarted after the outage")
        # The agent's own clock: its guests were gone before etcd could expire the lease.
        events = await controller.events("host-w", "SelfFenced")
        found = re.search(
            r"([\d.]+) s after its last renewal \(lease TTL (\d+) s\)", events[0].spec.message
        )
        assert found, events[0].spec.message
        assert float(found[1]) < int(found[2]), events[0].spec.message
    finally:
        await delete_vm(controller, fencing)
        await delete_vm(controller, keeping)
        assert agent_lab.stop_agent("host-w") == 0


# Last: it leaves host-w dead.
@pytest.mark.slow
async def test_watchdog_is_fed_while_the_agent_runs_and_fires_when_it_hangs(
    agent_lab: AgentLab, controller: Controller
) -> None:
    host = agent_lab.host("host-w")
    fifo = host.start_watchdog(timeout=3.0)
    pid = agent_lab.start_agent("host-w", "--watchdog", str(fifo))
    key = layout_keys.absolute(PREFIX, layout_keys.heartbeat("host-w")).encode()

    async def heartbeat() -> bool:
        return await controller.store.client.get(key) is not None

    await eventually(heartbeat, "host-w heartbeat")
    await asyncio.sleep(4.0)  # longer than the watchdog timeout: fed, so the host lives
    assert host.is_running() and not host.watchdog_fired()

    # nsenter (the agent's parent, which spawn started) stops itself when its child stops and
    # would then never reap the killed agent: wake it once the host is dead.
    launcher = parent_pid(pid)
    os.kill(pid, signal.SIGSTOP)  # a hung agent
    await eventually(host.watchdog_fired, "watchdog fired", timeout=30)
    agent_lab.agents.pop("host-w")
    os.kill(launcher, signal.SIGCONT)
    # Lab cleanup would otherwise signal the dead init and fail with ProcessLookupError.
    await asyncio.to_thread(host.wait_dead)


def parent_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
