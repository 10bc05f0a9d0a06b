"""The host agent and its VirtualMachine reconciler on libvirt's test driver and a real etcd.

Each agent runs in-process on its own `test:///PATH/host.xml` connection (a private host that
lives as long as the connection), so the test drives its domains through `agent.host`, the same
connection. `test:///default` is shared by every connection of the process: used where a host
must outlive an agent. The test driver has no qemu and no migration (e2e/test_agent.py covers
those on real libvirtd). Placement is written like the controller writes it: through a real
LeaderElector's fencing-token guard and `store.patch_status`.

LV activation (`DomainSettings.lvm`) runs real LVM on a loop device with a private lvm.conf;
this kernel has no device-mapper, so activation fails there and only the claim, the rollback
and the reporting are tested here (real activation: e2e/lab_tests/test_vm_activation_lab.py).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.apply import apply_one
from controller.cli import main as cli_main
from controller.migrations import lead_migrations
from controller.runtime import layout_keys
from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import HeartbeatTiming
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, VirtualMachine, VirtualMachineMigration
from crds.migration import PLACEMENT_SWITCHED, VOLUMES_ACTIVATED, VirtualMachineMigrationSpec
from crds.virtualmachine import RestartPolicy
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually
from reconcilers.drivers.domain_xml import DomainSpec, build_domain_xml
from reconcilers.drivers.libvirt import DomainState, LibvirtHost, WatchdogEvent
from reconcilers.lv_claim import active_on
from reconcilers.lvm_lock import LvmSettings
from reconcilers.virtualmachine import FINALIZER
from tests.support.agents import (
    Cluster,
    agent_with_watchdog_vm,
    domain_state,
    running_vm,
    vm_object,
)
from tests.support.ha import leader_token, reasons

DEADLINE = 30.0


async def test_agent_registers_and_keeps_a_heartbeat(cluster: Cluster) -> None:
    agent_task = asyncio.create_task(cluster.start_agent("host1"))
    await asyncio.sleep(0)  # the agent waits for its ClusterNode
    await cluster.add_node("host1", peer_uri=False)
    agent = await agent_task
    node = await cluster.store.get("ClusterNode", "host1")
    assert isinstance(node, ClusterNode)
    assert node.status.capacity is not None and node.status.capacity.cpus == 4
    assert node.status.capacity.memory_mib == 8192
    assert agent.settings.libvirt_uri.startswith("test:///")
    assert node.status.libvirt_uri is None, "a local-only URI is no use to peers: not reported"
    assert node.status.migration_address == "127.0.0.1"
    assert node.status.agent_version and node.status.last_heartbeat_time
    ready = node.status.condition("AgentReady")
    assert ready is not None and ready.status == "True"
    key = cluster.store.raw_key(layout_keys.heartbeat("host1"))
    kv = await cluster.store.client.get(key)
    assert kv is not None and b'"node": "host1"' in kv.value and kv.lease != 0


async def test_placed_vm_is_defined_and_started(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    vm = await running_vm(cluster, "vm1", "host1")

    assert vm.status.domain_uuid == vm.metadata.uid
    assert vm.status.running_generation == vm.metadata.generation
    assert FINALIZER in vm.metadata.finalizers
    ready = vm.status.condition("Ready")
    assert ready is not None and ready.status == "True"
    assert await domain_state(agent, "vm1") is DomainState.RUNNING
    assert agent.host is not None
    xml = await agent.host.domain_xml("vm1")
    assert str(cluster.tmp_path / "serial" / "vm1.log") in xml
    assert '<type arch="x86_64">hvm</type>' in xml or "hvm" in xml
    assert await cluster.events("vm1", "DomainStarted")


async def test_stopped_vm_is_shut_down(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    vm = await running_vm(cluster, "vm1", "host1")

    vm.spec.run_state = "stopped"
    await apply_one(cluster.store, vm)

    async def stopped() -> bool:
        return (await cluster.vm("vm1")).status.state == "Stopped"

    await eventually(stopped, "vm1 Stopped")
    assert await domain_state(agent, "vm1") is DomainState.SHUTOFF


async def test_domain_of_a_vm_placed_elsewhere_is_destroyed(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    await cluster.add_node("host2")
    host1 = await cluster.start_agent("host1")
    host2 = await cluster.start_agent("host2")
    await running_vm(cluster, "vm1", "host1")

    await cluster.place("vm1", "host2")

    async def moved() -> bool:
        vm = await cluster.vm("vm1")
        return vm.status.node == "host2" and vm.status.state == "Running"

    await eventually(moved, "vm1 running on host2")

    async def gone_from_host1() -> bool:
        return await domain_state(host1, "vm1") is None

    await eventually(gone_from_host1, "vm1 destroyed and undefined on host1")
    assert await domain_state(host2, "vm1") is DomainState.RUNNING
    events = await cluster.events("vm1", "DomainStoppedNotPlacedHere")
    assert events and events[0].spec.type == "Warning"
    assert events[0].spec.source.node == "host1"


async def test_agent_start_destroys_domains_placed_elsewhere_and_ignores_foreign_ones(
    cluster: Cluster,
) -> None:
    """On test:///default (shared by the process), so the domain exists before the agent."""
    await cluster.add_node("host1")
    await cluster.add_node("host2")
    name = f"vm-{secrets.token_hex(3)}"
    vm = await cluster.store.create(vm_object(name))
    await cluster.place(name, "host2")
    async with await LibvirtHost.connect("test:///default") as default:
        foreign = [d.name for d in await default.list_domains() if not d.metadata]
        assert vm.metadata.uid is not None
        spec = DomainSpec(
            name=name,
            uuid=vm.metadata.uid,
            domain_type="qemu",
            vcpus=1,
            memory_mib=128,
            metadata={"vm": name, "uid": vm.metadata.uid, "node": "host1"},
        )
        await default.define(build_domain_xml(spec))
        await default.start(name)

        await cluster.start_agent("host1", "test:///default")

        async def gone() -> bool:
            return await default.lookup(name) is None

        await eventually(gone, f"{name} destroyed and undefined on host1")
        assert await cluster.events(name, "DomainStoppedNotPlacedHere")
        remaining = [d.name for d in await default.list_domains() if not d.metadata]
        assert remaining == foreign  # domains without kvmctl metadata are never touched


async def test_spec_change_while_running_requires_a_restart(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    vm = await running_vm(cluster, "vm1", "host1")
    first_generation = vm.metadata.generation

    vm.spec.memory_mib = 256
    await apply_one(cluster.store, vm)

    async def restart_required() -> VirtualMachine | None:
        current = await cluster.vm("vm1")
        condition = current.status.condition("RestartRequired")
        return current if condition is not None and condition.status == "True" else None

    current: VirtualMachine = await eventually(restart_required, "RestartRequired=True")
    assert current.status.running_generation == first_generation
    assert agent.host is not None
    assert "262144" not in await agent.host.domain_xml("vm1")  # still the old definition

    current.spec.run_state = "stopped"
    await apply_one(cluster.store, current)

    async def stopped() -> VirtualMachine | None:
        fresh = await cluster.vm("vm1")
        return fresh if fresh.status.state == "Stopped" else None

    current = await eventually(stopped, "vm1 stopped")
    current.spec.run_state = "started"
    await apply_one(cluster.store, current)

    async def applied() -> bool:
        fresh = await cluster.vm("vm1")
        condition = fresh.status.condition("RestartRequired")
        return (
            fresh.status.state == "Running"
            and condition is not None
            and condition.status == "False"
            and fresh.status.running_generation == fresh.metadata.generation
        )

    await eventually(applied, "new spec running")
    assert "262144" in await agent.host.domain_xml("vm1")  # 256 MiB in KiB


async def test_deleted_vm_is_undefined_and_its_finalizer_removed(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    await running_vm(cluster, "vm1", "host1")

    marked = await cluster.store.delete("VirtualMachine", "vm1")
    assert marked is not None  # held by the finalizer

    async def gone() -> bool:
        return await cluster.store.try_get("VirtualMachine", "vm1") is None

    await eventually(gone, "vm1 deleted")
    assert await domain_state(agent, "vm1") is None


async def test_a_placement_of_an_older_term_starts_only_once_restamped(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    await cluster.store.create(vm_object("vm1"))
    await cluster.place("vm1", "host1", token=cluster.token - 1)

    async def waiting() -> bool:
        ready = (await cluster.vm("vm1")).status.condition("Ready")
        return ready is not None and ready.reason == "WaitingForTerm"

    await eventually(waiting, "vm1 waiting for the current term")
    assert await domain_state(agent, "vm1") is None, "not started under an older term"
    await cluster.place("vm1", "host1")  # the current leader stamps its token

    async def running() -> bool:
        return (await cluster.vm("vm1")).status.state == "Running"

    await eventually(running, "vm1 running once re-stamped")
    assert await domain_state(agent, "vm1") is DomainState.RUNNING


async def test_crashed_vm_is_restarted_up_to_the_limit(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    policy = RestartPolicy(max_restarts=2, window_seconds=600)
    await running_vm(cluster, "vm1", "host1", restartPolicy=policy.model_dump(by_alias=True))
    assert agent.host is not None

    for restarts in (1, 2):
        await agent.host.destroy("vm1")  # behind the agent's back, like a dying qemu

        async def restarted(count: int = restarts) -> bool:
            vm = await cluster.vm("vm1")
            return len(vm.status.restarts) == count and vm.status.state == "Running"

        await eventually(restarted, f"restart {restarts}")
        assert await domain_state(agent, "vm1") is DomainState.RUNNING

    await agent.host.destroy("vm1")

    async def given_up() -> VirtualMachine | None:
        vm = await cluster.vm("vm1")
        return vm if vm.status.state == "Crashed" else None

    vm: VirtualMachine = await eventually(given_up, "RestartLimitReached")
    condition = vm.status.condition("RestartLimitReached")
    assert condition is not None and condition.status == "True"
    assert await domain_state(agent, "vm1") is DomainState.SHUTOFF
    assert await cluster.events("vm1", "RestartLimitReached")
    assert len(await cluster.events("vm1", "VMRestarted")) == 1  # aggregated: count 2
    assert (await cluster.events("vm1", "VMRestarted"))[0].spec.count == 2


async def test_a_guest_agent_that_never_answered_does_not_reset_the_guest(
    cluster: Cluster,
) -> None:
    """The test driver has no guest agents, so no ping is ever answered: the check is never
    armed, and a guest still booting (or without an agent) is not reset, however many pings
    go unanswered (failures: 1 would reset at the first miss of an armed check)."""
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1")
    health = {"guestAgent": {"intervalSeconds": 1, "failures": 1}}
    await running_vm(cluster, "vm1", "host1", health=health)
    pings = agent.vm_reconciler.health

    def three_pings() -> bool:
        pinged = pings.pinged("vm1")
        return pinged is not None and pinged[1] >= 3

    await eventually(three_pings, "three unanswered guest-pings")
    pinged = pings.pinged("vm1")
    assert pinged is not None and not pinged[0].armed
    vm = await cluster.vm("vm1")
    assert (vm.status.state, vm.status.restarts) == ("Running", [])
    assert "GuestUnresponsive" not in await reasons(cluster.store, "VirtualMachine", "vm1")
    assert await domain_state(agent, "vm1") is DomainState.RUNNING


async def test_watchdog_resets_are_counted_and_the_agent_gives_up_at_the_limit(
    cluster: Cluster,
) -> None:
    """The test driver cannot fire a watchdog: the test hands the agent the event libvirt
    delivers (VIR_DOMAIN_EVENT_ID_WATCHDOG, action reset), the rest is the real agent."""
    agent = await agent_with_watchdog_vm(cluster, "reset")
    assert agent.host is not None and agent.vm_queue is not None
    info = await agent.host.lookup("vm1")
    assert info is not None
    fired = WatchdogEvent(name="vm1", uuid=info.uuid, action="reset")

    agent.domain_event(fired, agent.vm_queue)

    async def counted() -> VirtualMachine | None:
        vm = await cluster.vm("vm1")
        return vm if len(vm.status.restarts) == 1 else None

    vm: VirtualMachine = await eventually(counted, "the watchdog reset counted")
    assert vm.status.state == "Running"
    assert await domain_state(agent, "vm1") is DomainState.RUNNING  # QEMU reset it, not us
    [event] = await cluster.events("vm1", "GuestUnresponsive")
    assert event.spec.type == "Warning"
    assert "watchdog i6300esb fired (action reset) on host1; reset in place" in event.spec.message

    agent.domain_event(fired, agent.vm_queue)

    async def given_up() -> VirtualMachine | None:
        vm = await cluster.vm("vm1")
        return vm if vm.status.state == "Crashed" else None

    vm = await eventually(given_up, "RestartLimitReached after the second watchdog reset")
    condition = vm.status.condition("RestartLimitReached")
    assert condition is not None and condition.status == "True"
    assert condition.message is not None and condition.message.startswith("watchdog i6300esb")
    assert await domain_state(agent, "vm1") is DomainState.SHUTOFF  # destroyed, left down


async def test_domain_of_an_in_flight_migration_is_left_alone(cluster: Cluster) -> None:
    """The target must not destroy the incoming domain before the placement switches."""
    await cluster.add_node("host1")
    await cluster.add_node("host2")
    await cluster.start_agent("host1")
    host2 = await cluster.start_agent("host2")
    vm = await running_vm(cluster, "vm1", "host1")
    migration = VirtualMachineMigration(
        metadata=ObjectMeta(name="vm1-move"),
        spec=VirtualMachineMigrationSpec(vm="vm1", target_node="host2"),
    )
    migration.status.phase = "Scheduled"
    migration.status.source_node = "host3"
    await cluster.store.create(migration)

    def set_phase(phase: str) -> Callable[[Any], bool]:
        def mutate(obj: Any) -> bool:
            obj.status.phase = phase
            return True

        return mutate

    # Created as Scheduled from a node without an agent: no controller and no source agent act
    # on it, so only the target's rule is exercised.
    assert host2.host is not None
    spec = host2.vm_reconciler.domain_spec(vm)
    await host2.host.define(build_domain_xml(spec))  # the incoming domain
    await host2.host.start("vm1")
    assert host2.vm_queue is not None
    host2.vm_queue.add("vm1")
    await asyncio.sleep(1.0)  # give the agent every chance to do the wrong thing
    assert await domain_state(host2, "vm1") is DomainState.RUNNING

    await cluster.store.patch_status("VirtualMachineMigration", "vm1-move", set_phase("Failed"))

    async def destroyed() -> bool:
        return await domain_state(host2, "vm1") is None

    await eventually(destroyed, "incoming domain destroyed after the migration failed")


async def test_self_fence_destroys_vms_only_where_the_node_relies_on_it(
    etcd_private: EtcdCluster, tmp_path: Path
) -> None:
    async with Store(etcd_private.endpoints, prefix="/kvmctl", timeout=1.0) as store:
        cluster = Cluster(store, tmp_path)
        await cluster.lead()
        try:
            await cluster.add_node("fencer", self_fence=True)
            await cluster.add_node("keeper", self_fence=False)
            timing = HeartbeatTiming(ttl=4, renew_interval=0.5, self_fence_margin=1.5)
            fencer = await cluster.start_agent("fencer", timing=timing)
            keeper = await cluster.start_agent("keeper", timing=timing)
            await running_vm(cluster, "vm1", "fencer")
            await running_vm(cluster, "vm2", "keeper")
            etcd = etcd_private.members[0].process
            assert etcd is not None
            etcd.send_signal(signal.SIGSTOP)
            try:

                async def fenced() -> bool:
                    return await domain_state(fencer, "vm1") is DomainState.SHUTOFF

                await eventually(fenced, "vm1 destroyed by the self-fence")
                # Destroyed before etcd could have expired the lease (TTL after the last renewal).
                assert fencer.heartbeat.last_self_fence is not None
                renewed_at, destroyed_at = fencer.heartbeat.last_self_fence
                assert destroyed_at < renewed_at + timing.ttl
                # keeper handles its own deadline too (same timing, same outage; the heartbeat
                # clears `established` in the same step as it decides) but keeps vm2.
                await eventually(lambda: not keeper.heartbeat.established.is_set(), "deadline")
                assert not keeper.heartbeat.self_fenced
                assert await domain_state(keeper, "vm2") is DomainState.RUNNING
            finally:
                etcd.send_signal(signal.SIGCONT)
            assert fencer.heartbeat.self_fenced or fencer.heartbeat.lease_valid()

            # On a loaded machine the stall can outlast the stand-in controller's own term; the
            # agent then rightly starts nothing placed under the deposed term (fresh_if_placed_
            # here), so the new term stamps the placement again, as the HA controller's does.
            async def leading() -> bool:
                return cluster.elector.is_leader and cluster.token == await leader_token(store)

            await eventually(leading, "the stand-in controller leading")
            placement = (await cluster.vm("vm1")).status.placement
            if placement is None or placement.token != cluster.token:
                await cluster.place("vm1", "fencer")

            async def restarted() -> bool:
                return await domain_state(fencer, "vm1") is DomainState.RUNNING

            # Still placed on fencer once etcd is back: it starts again, and the self-fence is
            # not a crash: the restart policy does not count it.
            await eventually(restarted, "vm1 running again once the lease is back")
            [event] = await cluster.events("fencer", "SelfFenced")
            assert "after its last renewal (lease TTL 4 s): vm1" in event.spec.message

            async def reported_running() -> bool:
                vm = await cluster.store.get("VirtualMachine", "vm1")
                return isinstance(vm, VirtualMachine) and vm.status.state == "Running"

            await eventually(reported_running, "vm1 reported Running again")
            vm = await cluster.store.get("VirtualMachine", "vm1")
            assert isinstance(vm, VirtualMachine)
            assert vm.status.restarts == []
            assert "VMRestarted" not in await reasons(cluster.store, "VirtualMachine", "vm1")
            assert not fencer.self_fence_victims
        finally:
            await cluster.close()


async def test_controller_validates_migrations_and_switches_placement(cluster: Cluster) -> None:
    await cluster.add_node("host1")
    await cluster.add_node("host2")
    await cluster.start_agent("host1")
    await cluster.start_agent("host2")
    await running_vm(cluster, "vm1", "host1")
    recorder = EventRecorder(cluster.store, "test-controller")
    controller = asyncio.create_task(lead_migrations(cluster.store, recorder, cluster.term))
    try:
        for name, target in (("to-nowhere", "host9"), ("to-itself", "host1")):
            await cluster.store.create(
                VirtualMachineMigration(
                    metadata=ObjectMeta(name=name),
                    spec=VirtualMachineMigrationSpec(vm="vm1", target_node=target),
                )
            )

            async def rejected(name: str = name) -> VirtualMachineMigration | None:
                obj = await cluster.store.get("VirtualMachineMigration", name)
                assert isinstance(obj, VirtualMachineMigration)
                return obj if obj.status.phase == "Failed" else None

            failed: VirtualMachineMigration = await eventually(rejected, f"{name} rejected")
            assert failed.status.message

        # A valid request is scheduled from host1. The test driver cannot migrate: the source
        # agent's attempt fails and the VM keeps running on host1.
        await cluster.store.create(
            VirtualMachineMigration(
                metadata=ObjectMeta(name="to-host2"),
                spec=VirtualMachineMigrationSpec(vm="vm1", target_node="host2"),
            )
        )

        async def ended() -> VirtualMachineMigration | None:
            obj = await cluster.store.get("VirtualMachineMigration", "to-host2")
            assert isinstance(obj, VirtualMachineMigration)
            return obj if obj.status.phase in ("Succeeded", "Failed") else None

        result: VirtualMachineMigration = await eventually(ended, "to-host2 ended")
        assert result.status.source_node == "host1"
        assert result.status.phase == "Failed"
        assert await cluster.events("vm1", "MigrationFailed")

        async def running_on_host1() -> bool:
            # The agent reports "Migrating" while the migration runs, "Running" on its next pass.
            vm = await cluster.vm("vm1")
            placed = vm.status.placement is not None and vm.status.placement.node == "host1"
            return placed and vm.status.state == "Running"

        await eventually(running_on_host1, "vm1 Running on host1 again")

        # What the controller does once a source agent reports success: switch the placement.
        reported = VirtualMachineMigration(
            metadata=ObjectMeta(name="reported"),
            spec=VirtualMachineMigrationSpec(vm="vm1", target_node="host2"),
        )
        reported.status.phase = "Succeeded"
        reported.status.source_node = "host1"
        await cluster.store.create(reported)

        async def switched() -> VirtualMachineMigration | None:
            obj = await cluster.store.get("VirtualMachineMigration", "reported")
            assert isinstance(obj, VirtualMachineMigration)
            return obj if obj.status.condition(PLACEMENT_SWITCHED) is not None else None

        done: VirtualMachineMigration = await eventually(switched, "placement switched")
        condition = done.status.condition(PLACEMENT_SWITCHED)
        assert condition is not None and condition.status == "True"
        vm = await cluster.vm("vm1")
        assert vm.status.placement is not None
        assert (vm.status.placement.node, vm.status.placement.token) == ("host2", cluster.token)
    finally:
        controller.cancel()
        await asyncio.wait({controller})


async def test_migrate_command_reports_bad_names_in_one_line(
    cluster: Cluster, etcd_endpoints: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    base = ["--etcd", ",".join(etcd_endpoints), "--prefix", cluster.store.prefix, "migrate"]
    await cluster.add_node("host1")

    code = await asyncio.to_thread(cli_main, [*base, "nosuch", "--to", "host1"])
    assert code == 1
    assert capfd.readouterr().err == "error: VirtualMachine 'nosuch' not found\n"

    await cluster.store.create(vm_object("vm1"))
    code = await asyncio.to_thread(cli_main, [*base, "vm1", "--to", "host9"])
    assert code == 1
    assert capfd.readouterr().err == "error: ClusterNode 'host9' not found\n"

    with pytest.raises(SystemExit) as usage:
        cli_main([*base, "VM_1", "--to", "host1"])
    assert usage.value.code == 2
    assert "must be a DNS-1123 label" in capfd.readouterr().err

    code = await asyncio.to_thread(cli_main, [*base, "vm1", "--to", "host1"])
    assert code == 0
    assert capfd.readouterr().out.startswith("virtualmachinemigration/vm1-")
    objects, _ = await cluster.store.list_objects("VirtualMachineMigration")
    assert [(m.spec.vm, m.spec.target_node) for m in objects] == [("vm1", "host1")]


# -- LV activation ---------------------------------------------------------------------------

MIB = 1 << 20
NO_DEVICE_MAPPER_LVM_CONF = """\
global { activation = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
backup { backup = 0 archive = 0 }
"""


@pytest.fixture
def loop_device(make_loop_device: Callable[[int], str]) -> str:
    return make_loop_device(32 * MIB)


@pytest.fixture
async def lvm(tmp_path: Path, loop_device: str) -> tuple[LvmSettings, str]:
    """A VG with the LV `lv_vm1` on the loop device: (settings, VG name)."""
    system_dir = tmp_path / "lvm"
    system_dir.mkdir()
    (system_dir / "lvm.conf").write_text(NO_DEVICE_MAPPER_LVM_CONF)
    settings = LvmSettings(str(system_dir), (loop_device,), lock_ttl=5, lock_timeout=10)
    vg = f"vg_vm_{uuid.uuid4().hex[:8]}"
    driver = settings.driver()
    await driver.pvcreate(loop_device)
    await driver.vgcreate(vg, [loop_device])
    await driver.lvcreate(vg, "lv_vm1", 8 * MIB)
    return settings, vg


async def released(settings: LvmSettings, store: Store, vg: str) -> bool:
    """Nobody claims `vg/lv_vm1` and it carries no tag (a retry may hold it for a moment)."""
    [lv] = await settings.driver().lvs(vg)
    return await active_on(store, vg, "lv_vm1") is None and lv.tags == ()


async def ready_reason(cluster: Cluster, name: str) -> tuple[str, str] | None:
    condition = (await cluster.vm(name)).status.condition("Ready")
    return None if condition is None else (condition.reason, condition.message)


async def test_a_vm_whose_lv_cannot_be_activated_is_not_started(
    cluster: Cluster, lvm: tuple[LvmSettings, str]
) -> None:
    settings, vg = lvm
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1", lvm=settings)
    await cluster.store.create(vm_object("vm1", disks=[{"volume": f"{vg}/lv_vm1"}]))
    await cluster.place("vm1", "host1")

    async def refused() -> tuple[str, str] | None:
        ready = await ready_reason(cluster, "vm1")
        return ready if ready is not None and ready[0] == "VolumeActivationFailed" else None

    _, message = await eventually(refused, "vm1 Ready=False VolumeActivationFailed")
    assert message.startswith("not started on host1: ")
    assert "device-mapper" in message  # this kernel has none: LVM cannot activate
    assert await domain_state(agent, "vm1") is None  # never defined, never started
    [event] = await cluster.events("vm1", "VolumeActivationFailed")
    assert event.spec.type == "Warning"
    # Rolled back: neither the claim nor the tag is left behind (between retries).
    await eventually(lambda: released(settings, cluster.store, vg), "claim and tag rolled back")

    # A VM without volume disks on the same node is unaffected.
    await running_vm(cluster, "vm2", "host1")
    assert await domain_state(agent, "vm2") is DomainState.RUNNING
    assert await domain_state(agent, "vm1") is None


async def test_an_lv_claim_is_taken_over_only_from_a_fenced_node(
    cluster: Cluster, lvm: tuple[LvmSettings, str]
) -> None:
    settings, vg = lvm
    await cluster.add_node("host1")
    await cluster.add_node("host2")
    await cluster.start_agent("host1", lvm=settings)
    claim = f"{cluster.store.prefix}/lvm/activation/{vg}/lv_vm1".encode()
    await cluster.store.client.put(claim, b"host2")  # host2 runs (or ran) the VM
    await cluster.store.create(vm_object("vm1", disks=[{"volume": f"{vg}/lv_vm1"}]))
    await cluster.place("vm1", "host1")

    async def conflict() -> tuple[str, str] | None:
        ready = await ready_reason(cluster, "vm1")
        return ready if ready is not None and "is active on host2" in ready[1] else None

    await eventually(conflict, "activation refused while host2 holds the LV")
    assert await active_on(cluster.store, vg, "lv_vm1") == "host2"

    def fenced(node: Any) -> bool:
        node.status.health = "Fenced"
        return True

    await cluster.store.patch_status("ClusterNode", "host2", fenced)

    async def taken_over() -> bool:
        ready = await ready_reason(cluster, "vm1")
        # Taken from the fenced host2; activation then fails here (no device-mapper) and the
        # claim is rolled back, so nobody holds it any more.
        return (
            ready is not None
            and "device-mapper" in ready[1]
            and await active_on(cluster.store, vg, "lv_vm1") is None
        )

    await eventually(taken_over, "claim taken over from the fenced host2", timeout=2 * DEADLINE)


async def test_lv_hand_over_protocol_of_a_migration_whose_target_cannot_activate(
    cluster: Cluster, lvm: tuple[LvmSettings, str]
) -> None:
    """The source waits for the target's VolumesActivated; the target's failure fails the
    migration (the VM stays on the source), and the target deactivates what it took."""
    settings, vg = lvm
    await cluster.add_node("host1")
    await cluster.add_node("host2")
    await cluster.start_agent("host1", lvm=settings)
    await cluster.start_agent("host2", lvm=settings)
    # Stopped, so the source needs no activation here (which this kernel cannot do); the
    # source agent only needs the object.
    vm = vm_object("vm1", runState="stopped", disks=[{"volume": f"{vg}/lv_vm1"}])
    await cluster.store.create(vm)
    await cluster.place("vm1", "host1")
    migration = VirtualMachineMigration(
        metadata=ObjectMeta(name="vm1-move"),
        spec=VirtualMachineMigrationSpec(vm="vm1", target_node="host2"),
    )
    migration.status.phase = "Scheduled"  # as the controller leaves it
    migration.status.source_node = "host1"
    await cluster.store.create(migration)

    async def failed() -> VirtualMachineMigration | None:
        obj = await cluster.store.get("VirtualMachineMigration", "vm1-move")
        assert isinstance(obj, VirtualMachineMigration)
        return obj if obj.status.phase == "Failed" else None

    result: VirtualMachineMigration = await eventually(failed, "migration failed")
    assert result.status.message.startswith(f"host2 could not activate {vg}/lv_vm1: ")
    assert result.status.message.endswith("; the VM keeps running on host1")
    assert await cluster.events("vm1-move", "VolumeActivationFailed")  # from the target
    # The source claims the LV back (and cannot activate it here: no device-mapper).
    assert await cluster.events("vm1", "VolumeActivationFailed")

    async def target_released() -> bool:
        obj = await cluster.store.get("VirtualMachineMigration", "vm1-move")
        condition = obj.status.condition(VOLUMES_ACTIVATED)
        return condition is not None and condition.reason == "Released"

    await eventually(target_released, "the target released the LV after the failure")
    await eventually(lambda: released(settings, cluster.store, vg), "no claim and no tag left")
