"""Guest health on real parts (docs/ha.md, "Guest health"): a `kvmctl agent` in a simulated host
with its own libvirtd pings the TCG test guest's guest agent and watches its i6300esb watchdog.

The guest (e2e/guest/init.sh, on the kernel lab's generic kernel for its i6300esb driver) answers
guest-sync and guest-ping on org.qemu.guest_agent.0 and is told through that same channel, with
libvirt's qemuAgentCommand as `virsh qemu-agent-command` sends it, to stop answering
(`kvmctl-hang-agent`) or to stop feeding its watchdog (`kvmctl-starve-watchdog`).
"""

from __future__ import annotations

import asyncio

import libvirt
import libvirt_qemu
import pytest

from crds import Event
from e2e.guest.build import KERNEL_CMDLINE, ensure_watchdog_guest_image
from e2e.guest.console import last_boot
from e2e.harness.agent_lab import (
    AgentLab,
    Controller,
    apply_running,
    boots,
    delete_vm,
    eventually,
    unique,
)
from e2e.harness.hosts import SimulatedHost

ANSWERED = b"kvmctl-guest answered guest-ping"
FEEDING = b"kvmctl-guest feeding the watchdog"


async def agent_command(host: SimulatedHost, name: str, command: str) -> str:
    """Send one command to the domain's guest agent through the host's libvirtd; its reply."""

    def send() -> str:
        connection = libvirt.open(host.libvirt_uri)
        try:
            reply: str = libvirt_qemu.qemuAgentCommand(
                connection.lookupByName(name), f'{{"execute":"{command}"}}', 30, 0
            )
            return reply
        finally:
            connection.close()

    return await asyncio.to_thread(send)


async def unresponsive_events(controller: Controller, name: str, check: str) -> list[Event]:
    """The GuestUnresponsive Warnings of VM `name` whose message names `check`."""
    events = await controller.events(name, "GuestUnresponsive")
    return [event for event in events if check in event.spec.message]


async def restarts_counted(controller: Controller, name: str, count: int) -> None:
    async def counted() -> bool:
        vm = await controller.vm(name)
        return vm.status.state == "Running" and len(vm.status.restarts) == count

    await eventually(counted, f"{name} Running with {count} restarts in status")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a first run builds the kernel lab's kernel for the watchdog guest
async def test_hung_guest_agent_and_starved_watchdog_reset_the_guest_in_place(
    agent_lab: AgentLab, controller: Controller
) -> None:
    image = await asyncio.to_thread(ensure_watchdog_guest_image)
    name = unique("health")
    host = agent_lab.host("host-a")
    log = agent_lab.serial_log(name)
    pid = await apply_running(
        agent_lab,
        controller,
        name,
        "host-a",
        boot={"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": KERNEL_CMDLINE},
        health={
            "watchdog": {"model": "i6300esb", "action": "reset"},
            "guestAgent": {"intervalSeconds": 2, "failures": 2},
        },
        restartPolicy={"maxRestarts": 3, "windowSeconds": 3600},
    )

    # The agent's pings are answered (the check is armed); then the guest agent hangs.
    await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering the agent's pings")
    assert await agent_command(host, name, "guest-ping") == '{"return":{}}'
    assert await agent_command(host, name, "kvmctl-hang-agent") == '{"return":{}}'
    await eventually(lambda: boots(agent_lab, name) == 2, f"{name} reset after the agent hung")
    assert host.qemu_guests().get(name) == pid  # reset in place, not restarted
    await restarts_counted(controller, name, 1)
    (hung,) = await unresponsive_events(controller, name, "guest agent did not answer 2 ")
    assert hung.spec.type == "Warning" and "reset in place (1 of 3" in hung.spec.message

    # Armed again by the rebooted guest's answers; then it stops feeding its watchdog device.
    await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering again after the reset")
    assert FEEDING in last_boot(log)
    assert await agent_command(host, name, "kvmctl-starve-watchdog") == '{"return":{}}'
    await eventually(lambda: boots(agent_lab, name) == 3, f"{name} reset by its watchdog")
    assert host.qemu_guests().get(name) == pid
    await restarts_counted(controller, name, 2)

    async def fired() -> list[Event]:
        return await unresponsive_events(controller, name, "watchdog i6300esb fired (action reset)")

    (watchdog,) = await eventually(fired, "a GuestUnresponsive Warning naming the watchdog")
    assert "reset in place (2 of 3" in watchdog.spec.message
    # The reboot QEMU did is not also taken for a hung guest agent: once the guest answers again,
    # still two resets, and one Warning each (they aggregate: the same reason and template).
    await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering after the watchdog")
    assert boots(agent_lab, name) == 3
    assert len((await controller.vm(name)).status.restarts) == 2
    assert watchdog.spec.count == 2

    await delete_vm(controller, name)
