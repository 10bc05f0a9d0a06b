"""fence_kvmctl against a real TCG guest: a `kvmctl agent` with its own libvirtd in a simulated
host (the lab of e2e/test_agent.py), a real etcd, the leader's guest fencing carrying out the
requests, the fence agent run as a separate process with its options on stdin, as Pacemaker's
stonithd runs it.
"""

from __future__ import annotations

import time

import pytest

from controller.apply import apply_one
from controller.ha.guest_requests import GUEST_CLUSTER_LABEL
from controller.runtime.leader_record import guard_compare
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
from e2e.harness.fence_agent import run_fence_kvmctl
from e2e.harness.guest_fencing import guest_fencing

FENCE_TIMEOUT = 90
GUEST = "guests"


async def fence(lab: AgentLab, action: str, plug: str) -> tuple[int, str, float]:
    """Run fence_kvmctl with `key=value` lines on stdin: (exit code, stdout, seconds taken)."""
    values = {
        "action": action,
        "plug": plug,
        "etcd": ",".join(lab.etcd.endpoints),
        "prefix": PREFIX,
        "guest_cluster": GUEST,
        "power_timeout": str(FENCE_TIMEOUT),
    }
    started = time.monotonic()
    code, out = await run_fence_kvmctl(values, FENCE_TIMEOUT + 30)
    return code, out, time.monotonic() - started


async def join(lead: Controller, name: str) -> None:
    """Label the VM a member of the guest cluster, as an admin's manifest does."""
    vm = await lead.vm(name)
    vm.metadata.labels[GUEST_CLUSTER_LABEL] = GUEST
    await apply_one(lead.store, vm)


@pytest.mark.slow
async def test_fence_off_status_on_reboot_of_a_tcg_guest(
    agent_lab: AgentLab,
    controller: Controller,
) -> None:
    name = unique("fenced")
    host = agent_lab.host("host-a")
    # A long graceful timeout: fencing must not wait for it.
    await apply_running(agent_lab, controller, name, "host-a", shutdownTimeoutSeconds=3600)
    await join(controller, name)
    guard = [guard_compare(controller.store.client, controller.elector.key, controller.token)]
    async with guest_fencing(controller.store, controller.token, guard):

        async def published_on() -> bool:
            return (await fence(agent_lab, "status", name))[:2] == (0, "Status: ON\n")

        await eventually(published_on, f"{name} published on")

        code, out, took = await fence(agent_lab, "off", name)
        assert (code, out) == (0, "Success: Powered OFF\n")
        print(f"fence off of a running TCG guest: {took:.2f} s (process start included)")
        assert name not in host.qemu_guests()
        stopped = await controller.events(name, "DomainStopped")
        assert stopped and "destroyed after 0 s" in stopped[-1].spec.message
        assert (await controller.vm(name)).status.state == "Stopped"

        code, out, _ = await fence(agent_lab, "status", name)
        assert (code, out) == (2, "Status: OFF\n")

        code, out, _ = await fence(agent_lab, "on", name)
        assert (code, out) == (0, "Success: Powered ON\n")
        await running_on(controller, name, "host-a")
        await eventually(lambda: boots(agent_lab, name) == 2, f"{name} booted again")
        await booted(agent_lab, name)
        assert (await controller.vm(name)).spec.shutdown_timeout_seconds == 3600

        pid = host.qemu_guests()[name]
        code, out, _ = await fence(agent_lab, "reboot", name)
        assert (code, out) == (0, "Success: Rebooted\n")
        assert host.qemu_guests().get(name) not in (None, pid)
        await eventually(lambda: boots(agent_lab, name) == 3, f"{name} booted after the reboot")

    await delete_vm(controller, name)  # destroys the domain at once
    assert name not in host.qemu_guests()
