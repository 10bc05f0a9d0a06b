"""A watchdog that powers the guest off (`action: poweroff`), on libvirt's test driver and a real
etcd: the test hands the agent the event libvirt delivers (VIR_DOMAIN_EVENT_ID_WATCHDOG, action
poweroff: the test driver cannot fire one) and stops the domain behind its back as QEMU then
does; the rest is the real agent (e2e/test_guest_health.py has it on QEMU)."""

from __future__ import annotations

from crds import VirtualMachine
from e2e.harness.polling import eventually
from reconcilers.drivers.libvirt import DomainState, WatchdogEvent
from tests.support.agents import Cluster, agent_with_watchdog_vm, domain_state
from tests.support.ha import reasons

FIRED = "watchdog i6300esb fired (action poweroff) on host1"


async def test_a_watchdog_poweroff_is_restarted_as_a_failed_guest_then_given_up(
    cluster: Cluster,
) -> None:
    agent = await agent_with_watchdog_vm(cluster, "poweroff")
    assert agent.host is not None and agent.vm_queue is not None

    async def power_off() -> None:
        assert agent.host is not None and agent.vm_queue is not None
        info = await agent.host.lookup("vm1")
        assert info is not None
        fired = WatchdogEvent(name="vm1", uuid=info.uuid, action="poweroff")
        agent.domain_event(fired, agent.vm_queue)
        await agent.host.destroy("vm1")

    await power_off()

    async def restarted() -> VirtualMachine | None:
        vm = await cluster.vm("vm1")
        return vm if len(vm.status.restarts) == 1 and vm.status.state == "Running" else None

    await eventually(restarted, "vm1 restarted after its watchdog powered it off")
    assert await domain_state(agent, "vm1") is DomainState.RUNNING
    [event] = await cluster.events("vm1", "GuestUnresponsive")
    assert event.spec.message == f"{FIRED}; restarted in place (1 of 1 in 600 s)"
    assert "VMRestarted" not in await reasons(cluster.store, "VirtualMachine", "vm1")

    await power_off()

    async def given_up() -> VirtualMachine | None:
        vm = await cluster.vm("vm1")
        return vm if vm.status.state == "Crashed" else None

    vm: VirtualMachine = await eventually(given_up, "RestartLimitReached at the second poweroff")
    condition = vm.status.condition("RestartLimitReached")
    limit = "1 restarts within 600 s reached the limit of 1; left down"
    assert condition is not None and condition.message == f"{FIRED}: {limit}"
    messages = [event.spec.message for event in await cluster.events("vm1", "GuestUnresponsive")]
    assert f"{FIRED}: {limit}" in messages
    assert await domain_state(agent, "vm1") is DomainState.SHUTOFF
