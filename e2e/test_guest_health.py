"""Guest health on real parts (docs/ha.md, "Guest health"): a `kvmctl agent` in a simulated host
with its own libvirtd pings the TCG test guest's guest agent and watches its i6300esb watchdog.

The guest (e2e/guest/init.sh, on the kernel lab's generic kernel for its i6300esb driver) runs
Debian's qemu-ga (7.2) on org.qemu.guest_agent.0. The tests speak to it through libvirt's
qemuAgentCommand, as `virsh qemu-agent-command` sends it: `guest-exec` of the guest's
`/bin/kvmctl-hang-agent` SIGSTOPs qemu-ga, of `/bin/kvmctl-starve-watchdog` SIGKILLs the watchdog
feeder. The last test runs a real `kvmctl controller` (the HA engine) instead of the stand-in, so
that a guest given up on host-a is relocated to host-b.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from controller.runtime.store import Store
from crds import Event
from e2e.guest.build import (
    KERNEL_CMDLINE,
    WATCHDOG_GUEST_MEMORY_MIB,
    ensure_watchdog_guest_image,
)
from e2e.guest.console import last_boot
from e2e.harness.agent_lab import (
    KVMCTL,
    PREFIX,
    AgentLab,
    Controller,
    apply_running,
    boots,
    delete_vm,
    eventually,
    guest_vm,
    running_on,
    unique,
)
from e2e.harness.hosts import REPO_ROOT, SimulatedHost

ANSWERED = b"qemu-ga: info: guest-ping called"
"""qemu-ga's syslog line for a guest-ping it ran (the guest copies syslog to its console)."""
FEEDING = b"kvmctl-guest feeding the watchdog"


async def agent_command(host: SimulatedHost, name: str, execute: str, **arguments: Any) -> Any:
    """Send one command to the domain's guest agent through the host's libvirtd; its reply."""
    request = json.dumps({"execute": execute, **({"arguments": arguments} if arguments else {})})

    def send() -> str:
        connection = libvirt.open(host.libvirt_uri)
        try:
            reply: str = libvirt_qemu.qemuAgentCommand(
                connection.lookupByName(name), request, 30, 0
            )
            return reply
        finally:
            connection.close()

    return json.loads(await asyncio.to_thread(send))


async def guest_exec(host: SimulatedHost, name: str, script: str) -> int:
    """Start the guest's `/bin/<script>` with guest-exec; the PID qemu-ga answers with at once."""
    reply = await agent_command(host, name, "guest-exec", path=f"/bin/{script}")
    match reply:
        case {"return": {"pid": int(pid)}}:
            return pid
    raise AssertionError(f"guest-exec {script}: {reply}")


async def starve_watchdog(host: SimulatedHost, name: str) -> None:
    """Have the guest kill its watchdog feeder; wait until the script exited, and with 0."""
    pid = await guest_exec(host, name, "kvmctl-starve-watchdog")

    async def exited() -> dict[str, Any] | None:
        status = await agent_command(host, name, "guest-exec-status", pid=pid)
        return status if status["return"]["exited"] else None

    status = await eventually(exited, f"kvmctl-starve-watchdog (pid {pid}) exited in {name}")
    assert status == {"return": {"exited": True, "exitcode": 0}}


async def unresponsive_events(controller: Controller, name: str, check: str) -> list[Event]:
    """The GuestUnresponsive Warnings of VM `name` whose message names `check`."""
    events = await controller.events(name, "GuestUnresponsive")
    return [event for event in events if check in event.spec.message]


async def event_reasons(controller: Controller, name: str) -> set[str]:
    """The reasons of every Event recorded about VM `name` so far."""
    objects, _ = await controller.store.list_objects("Event")
    return {
        event.spec.reason
        for event in objects
        if isinstance(event, Event) and event.spec.involved_object.name == name
    }


async def restarts_counted(controller: Controller, name: str, count: int) -> None:
    async def counted() -> bool:
        vm = await controller.vm(name)
        return vm.status.state == "Running" and len(vm.status.restarts) == count

    await eventually(counted, f"{name} Running with {count} restarts in status")


async def watchdog_guest(
    agent_lab: AgentLab, controller: Controller, name: str, action: str, **spec: Any
) -> int:
    """Run VM `name` on host-a with the i6300esb (`action`) and a guest agent (the channel the
    test speaks through), on the watchdog guest; once its guest agent answers, its qemu PID."""
    image = await asyncio.to_thread(ensure_watchdog_guest_image)
    pid = await apply_running(
        agent_lab,
        controller,
        name,
        "host-a",
        memoryMiB=WATCHDOG_GUEST_MEMORY_MIB,
        boot={"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": KERNEL_CMDLINE},
        health={
            "watchdog": {"model": "i6300esb", "action": action},
            "guestAgent": {"intervalSeconds": 2, "failures": 2},
        },
        **spec,
    )
    log = agent_lab.serial_log(name)
    await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering the agent's pings")
    assert FEEDING in last_boot(log)
    return pid


@pytest.mark.slow
@pytest.mark.timeout(900)  # a first run builds the kernel lab's kernel for the watchdog guest
async def test_hung_guest_agent_and_starved_watchdog_reset_the_guest_in_place(
    agent_lab: AgentLab, controller: Controller
) -> None:
    name = unique("health")
    host = agent_lab.host("host-a")
    log = agent_lab.serial_log(name)
    policy = {"maxRestarts": 3, "windowSeconds": 3600}
    pid = await watchdog_guest(agent_lab, controller, name, "reset", restartPolicy=policy)

    # The agent's pings are answered (the check is armed); then the guest agent hangs.
    assert await agent_command(host, name, "guest-ping") == {"return": {}}
    await guest_exec(host, name, "kvmctl-hang-agent")
    await eventually(lambda: boots(agent_lab, name) == 2, f"{name} reset after the agent hung")
    assert host.qemu_guests().get(name) == pid  # reset in place, not restarted
    await restarts_counted(controller, name, 1)
    (hung,) = await unresponsive_events(controller, name, "guest agent did not answer 2 ")
    assert hung.spec.type == "Warning" and "reset in place (1 of 3" in hung.spec.message

    # Armed again by the rebooted guest's answers; then it stops feeding its watchdog device.
    await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering again after the reset")
    assert FEEDING in last_boot(log)
    await starve_watchdog(host, name)
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


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_watchdog_poweroff_is_a_guest_failure_restarted_and_counted(
    agent_lab: AgentLab, controller: Controller
) -> None:
    """QEMU powers the guest off when its watchdog fires (`action: poweroff`): not a clean
    shutdown, a failed guest, restarted per its restartPolicy and named in GuestUnresponsive."""
    name = unique("wdoff")
    host = agent_lab.host("host-a")
    policy = {"maxRestarts": 3, "windowSeconds": 3600}
    pid = await watchdog_guest(agent_lab, controller, name, "poweroff", restartPolicy=policy)

    await starve_watchdog(host, name)
    await eventually(lambda: boots(agent_lab, name) == 2, f"{name} started again")
    assert host.qemu_guests().get(name) not in (None, pid)  # powered off, then started anew
    await restarts_counted(controller, name, 1)

    async def fired() -> list[Event]:
        return await unresponsive_events(
            controller, name, "watchdog i6300esb fired (action poweroff)"
        )

    (warning,) = await eventually(fired, "a GuestUnresponsive Warning naming the watchdog")
    assert warning.spec.type == "Warning"
    assert "on host-a; restarted in place (1 of 3 in 3600 s)" in warning.spec.message
    assert "VMRestarted" not in await event_reasons(controller, name)  # not taken for a crash
    await delete_vm(controller, name)


@contextlib.contextmanager
def ha_controller(agent_lab: AgentLab) -> Iterator[int]:
    """A real `kvmctl controller` (the HA engine: placement, restart policy, relocation) on the
    lab's etcd, in the test's namespace; its PID. SIGTERMed (then killed) by that PID."""
    argv = [
        KVMCTL, "--etcd", ",".join(agent_lab.etcd.endpoints), "--prefix", PREFIX,
        "controller", "--identity", "e2e-ha", "--metrics-port", "0",
    ]  # fmt: skip
    with open(agent_lab.lab.root / "controller.log", "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_guest_that_keeps_hanging_is_reset_then_relocated_by_the_controller(
    agent_lab: AgentLab,
) -> None:
    """At the restart limit after a real reset the agent gives up on host-a (destroyed,
    RestartLimitReached); the real controller relocates the VM to host-b, which runs it."""
    image = await asyncio.to_thread(ensure_watchdog_guest_image)
    name = unique("reloc")
    log = agent_lab.serial_log(name)
    host_a, host_b = agent_lab.host("host-a"), agent_lab.host("host-b")
    vm = guest_vm(
        name,
        agent_lab.image,
        memoryMiB=WATCHDOG_GUEST_MEMORY_MIB,
        boot={"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": KERNEL_CMDLINE},
        health={"guestAgent": {"intervalSeconds": 2, "failures": 2}},
        restartPolicy={"maxRestarts": 1, "windowSeconds": 3600, "maxRelocations": 1},
        failoverDomain={
            "nodes": [{"name": "host-a", "priority": 1}, {"name": "host-b", "priority": 2}],
            "ordered": True,
            "restricted": True,
        },
    )
    async with Store(agent_lab.etcd.endpoints, prefix=PREFIX) as store:
        reader = Controller(store)  # reads only: the HA controller below leads
        with ha_controller(agent_lab):
            await store.create(vm)
            await running_on(reader, name, "host-a")  # placed by the engine: priority 1
            await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering on host-a")
            pid = host_a.qemu_guests()[name]

            # First hang: reset in place, counted (1 of 1).
            await guest_exec(host_a, name, "kvmctl-hang-agent")
            await eventually(lambda: boots(agent_lab, name) == 2, f"{name} reset on host-a")
            assert host_a.qemu_guests().get(name) == pid
            await restarts_counted(reader, name, 1)
            (reset,) = await unresponsive_events(reader, name, "on host-a; reset in place (1 of 1")
            assert reset.spec.type == "Warning"
            await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering again")

            # Second hang, at the limit: the agent gives up here, the controller relocates.
            await guest_exec(host_a, name, "kvmctl-hang-agent")
            (limit,) = await reader.events(name, "RestartLimitReached")
            assert limit.spec.message == (
                "guest agent did not answer 2 guest-pings in a row (2 s apart) on host-a: "
                "1 restarts within 3600 s reached the limit of 1; left down"
            )
            given_up = await unresponsive_events(reader, name, "destroyed and left down")
            assert len(given_up) == 1 and "on host-a" in given_up[0].spec.message
            (relocating,) = await reader.events(name, "VMRelocating")
            assert relocating.spec.message == (
                "crashed again after 1 restarts in 3600s on host-a; relocation 1 of 1 to host-b"
            )
            await running_on(reader, name, "host-b")
            relocated = await reader.vm(name)
            assert (relocated.status.relocations, relocated.status.restarts) == (1, [])
            assert name not in host_a.qemu_guests() and name in host_b.qemu_guests()
            await eventually(lambda: boots(agent_lab, name) == 3, f"{name} booted on host-b")
            await eventually(lambda: ANSWERED in last_boot(log), f"{name} answering on host-b")
            await delete_vm(reader, name)
