"""The HA engine in production: the etcd Environment and the leader-only HA loop, on real parts.

A real etcd; agents' heartbeats are real leases on it (the tests hold and drop them as an agent
would); the fence devices are fence-agents' real `fence_dummy` run by the real `FenceRunner`;
the agent side runs against libvirt's `test://` driver (a private in-process host). The tests
play the agents' VM status reports. Engine timings are shortened; leader terms are long.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import prometheus_client
import pytest

from controller.ha.agent_side import HaReporter, heartbeat_timing
from controller.ha.environment import HaTimings, Place
from controller.ha.production import EtcdEnvironment
from controller.ha.production_core import KINDS
from controller.migrations import Term
from controller.runtime import telemetry
from controller.runtime.events import EventRecorder
from controller.runtime.informer import SharedInformers
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import current_leader, guard_compare
from controller.runtime.manager import Manager
from controller.runtime.store import Store
from crds import ObjectMeta
from crds.migration import VirtualMachineMigration, VirtualMachineMigrationSpec
from e2e.harness.polling import eventually
from e2e.harness.private_host import HOST_XML
from reconcilers.drivers.domain_xml import DomainSpec, build_domain_xml
from reconcilers.drivers.libvirt import LibvirtHost
from tests.support.cli import Kvmctl
from tests.support.ha import (
    ELECTION,
    TIMINGS,
    Leases,
    dummy_fencing,
    events_of,
    get_node,
    get_vm,
    leader_token,
    node_object,
    placed_on,
    power_fenced_node,
    reasons,
    recorded,
    report_running,
    start_controller,
    stop_controller,
    vm_object,
)

# The whole path: lease lost -> Unknown -> Fencing -> fence_dummy -> Fenced -> recovered -------


async def start_stale_domain(host: LibvirtHost, vm: str) -> None:
    """A kvmctl domain of `vm` left running on a host that was lost (or wrongly acked)."""
    stale = DomainSpec(
        name=vm,
        uuid=str(uuid.uuid4()),
        domain_type="qemu",
        vcpus=1,
        memory_mib=64,
        metadata={"vm": vm, "uid": "stale"},
    )
    await host.define(build_domain_xml(stale))
    await host.start(vm)


async def test_lost_node_is_power_fenced_and_its_vm_recovered_then_rejoins(
    store: Store, leases: Leases, controller: Manager, tmp_path: Path
) -> None:
    power = await power_fenced_node(store, tmp_path, "a", secret_of="a")
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    await store.create(vm_object("vm1"))

    # Initial placement is the engine's: the VM goes to its preferred node.
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    assert (await get_node(store, "a")).status.health == "Online"
    await report_running(store, "vm1", "a")

    await leases.drop("a")
    recovered = await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b")

    node = await get_node(store, "a")
    assert node.status.health == "Fenced"
    assert node.status.fence is not None
    assert (node.status.fence.how, node.status.fence.method) == ("PowerOff", "dummy")
    assert power.read_text() == "off"
    assert recovered.status.placement is not None
    assert recovered.status.placement.token == await leader_token(store)
    # a's report was about the old placement: no agent may take it for its own (a VM placed
    # back on a later must be started there, not counted as a crash to restart in place).
    assert recovered.status.node is None

    # The engine records each event after the write it describes: wait for them.
    lost = {"NodeLost", "FencingStarted", "NodeFenced"}
    await eventually(lambda: recorded(store, "ClusterNode", "a", lost), "a's fencing events")
    moved = {"VMPlaced", "VMRelocating"}
    await eventually(lambda: recorded(store, "VirtualMachine", "vm1", moved), "vm1's events")
    for event in await events_of(store, "ClusterNode", "a"):
        assert str(power) not in event.spec.message, "a secret parameter leaked into an event"

    # The node comes back: it stays Fenced until its agent destroyed every stale domain.
    await leases.hold("a")
    assert (await get_node(store, "a")).status.health == "Fenced"
    host_xml = tmp_path / "host-a.xml"
    host_xml.write_text(HOST_XML)
    async with await LibvirtHost.connect(f"test://{host_xml}") as host:
        await start_stale_domain(host, "vm1")
        reporter = HaReporter(store, "a", TIMINGS)
        await reporter.step(await get_node(store, "a"), host, past_deadline=False)
        assert [d.name for d in await host.list_domains() if d.state.value == "running"] == []

    async def online() -> bool:
        return (await get_node(store, "a")).status.health == "Online"

    await eventually(online, "a back Online after its agent cleaned up")
    assert (await get_node(store, "a")).status.fence is None
    assert (await placed_on(store, "vm1", "b")) is not None


async def test_a_device_using_another_nodes_secret_is_flagged_and_never_run(
    store: Store, leases: Leases, controller: Manager, tmp_path: Path
) -> None:
    """The fence-device checker warns at once; at fence time the device is refused, unrun."""
    power = await power_fenced_node(store, tmp_path, "a", secret_of="b")
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")

    async def warned(reason: str) -> list[str]:
        return [
            e.spec.message
            for e in await events_of(store, "ClusterNode", "a")
            if e.spec.reason == reason and "'fence-b' is not for fencing a" in e.spec.message
        ]

    (early,) = await eventually(lambda: warned("InvalidFenceDevice"), "an early warning")
    assert "kvmctl.io/node=a or kvmctl.io/usage=fencing" in early
    await store.create(vm_object("vm1"))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")
    await leases.drop("a")

    async def fencing_failed() -> bool:
        # FencingFailed events of one template aggregate: the message is the latest one, which
        # may be the engine's "all methods failed" between two refusals of the device.
        return "FencingFailed" in await reasons(store, "ClusterNode", "a")

    await eventually(fencing_failed, "fencing refused")
    assert power.read_text() == "on", "the device ran"
    assert (await get_node(store, "a")).status.health == "Fencing"
    assert await placed_on(store, "vm1", "a") is not None


async def test_failing_fence_device_blocks_recovery_until_fence_ack(
    store: Store, leases: Leases, controller: Manager, kvmctl_thread: Kvmctl, tmp_path: Path
) -> None:
    await store.create(
        node_object("a", dummy_fencing(parameters={"type": "fail", "power_timeout": "1"}))
    )
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    await store.create(vm_object("vm1"))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")
    await leases.drop("a")

    async def retried() -> bool:
        events = {e.spec.reason: e.spec.count for e in await events_of(store, "ClusterNode", "a")}
        return events.get("FencingStarted", 0) >= 2 and "FencingFailed" in events

    await eventually(retried, "fencing of a to fail and be retried")
    assert (await get_node(store, "a")).status.health == "Fencing"
    assert await placed_on(store, "vm1", "a") is not None, "recovered without fencing"

    code, out, err = await kvmctl_thread("fence", "ack", "a")
    assert code == 0, err
    assert "fence acknowledged" in out
    await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b after the ack")
    node = await get_node(store, "a")
    assert node.status.health == "Fenced"
    assert node.status.fence is not None and node.status.fence.how == "ManualAck"
    key = f"{store.prefix}/requests/fence-ack/a".encode()
    assert await store.client.get(key) is None, "the ack was not consumed"

    # The ack was wrong: a only lost its lease and still runs vm1. Its agent, back, destroys it
    # and says so on the node and on the VM.
    await leases.hold("a")
    host_xml = tmp_path / "host-a.xml"
    host_xml.write_text(HOST_XML)
    async with await LibvirtHost.connect(f"test://{host_xml}") as host:
        await start_stale_domain(host, "vm1")
        reporter = HaReporter(store, "a", TIMINGS, EventRecorder(store, "kvmctl-agent", "a"))
        await reporter.step(await get_node(store, "a"), host, past_deadline=False)
        assert [d.name for d in await host.list_domains() if d.state.value == "running"] == []
    wrong_ack = {"AckedNodeWasRunning"}
    assert await recorded(store, "ClusterNode", "a", wrong_ack)
    assert await recorded(store, "VirtualMachine", "vm1", wrong_ack)
    (warning,) = [
        e for e in await events_of(store, "ClusterNode", "a") if e.spec.reason in wrong_ack
    ]
    assert warning.spec.type == "Warning"
    assert "acknowledged as off but found running vm1: destroyed" in warning.spec.message


# Leadership: a deposed leader's writes fail ---------------------------------------------------


async def test_a_new_leader_restamps_placements_of_older_terms(
    store: Store, leases: Leases
) -> None:
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    await store.create(vm_object("vm1"))
    manager, task = await start_controller(store.endpoints, store.prefix, "ctl-1")
    try:
        await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
        await report_running(store, "vm1", "a")
        old_term = await leader_token(store)
    finally:
        await stop_controller(manager, task)
    manager, task = await start_controller(store.endpoints, store.prefix, "ctl-2")
    try:

        async def restamped() -> bool:
            leader = await current_leader(store.client, f"{store.prefix}/leader/controller")
            placement = (await get_vm(store, "vm1")).status.placement
            if leader is None or placement is None:
                return False
            return placement.token == leader.token

        await eventually(restamped, "vm1's placement stamped with the new term")
        assert await leader_token(store) != old_term
        assert (await placed_on(store, "vm1", "a")) is not None, "kept where it runs"
    finally:
        await stop_controller(manager, task)


async def test_deposed_leader_placement_write_fails(store: Store, leases: Leases) -> None:
    await store.create(node_object("a"))
    await leases.hold("a")
    await store.create(vm_object("vm1"))
    terms: list[int] = []

    async def lead_once(token: int) -> None:
        terms.append(token)
        await asyncio.Event().wait()

    first = LeaderElector(store.client, store.prefix, "controller", "old", ELECTION)
    first_run = asyncio.create_task(first.run(lead_once))
    await eventually(lambda: bool(terms), "the first leader")
    old_token = terms[0]
    first_run.cancel()  # resigns
    await asyncio.wait({first_run})
    second = LeaderElector(store.client, store.prefix, "controller", "new", ELECTION)
    second_run = asyncio.create_task(second.run(lead_once))
    try:
        await eventually(lambda: len(terms) == 2, "the second leader")
        informers = SharedInformers(store, None)
        for kind in KINDS:
            informers.informer(kind)
        informers.start()
        await informers.wait_for_sync()
        recorder = EventRecorder(store, "test")
        changed = asyncio.Event()
        key = f"{store.prefix}/leader/controller"
        for token, expect_deposed in ((old_token, True), (terms[1], False)):
            term = Term(token, [guard_compare(store.client, key, token)])
            env = EtcdEnvironment(store, informers, recorder, term, changed, TIMINGS)
            async with env:
                world = await env.observe()
                assert world.nodes["a"].lease_alive
                await env.apply(Place("vm1", "a"))
                assert env.deposed is expect_deposed
                assert await env.wait(env.now() + 0.1) is not expect_deposed
            vm = await get_vm(store, "vm1")
            if expect_deposed:
                assert vm.status.placement is None, "a deposed leader's placement was written"
            else:
                assert vm.status.placement is not None
                assert vm.status.placement.token == terms[1]
        await informers.stop()
    finally:
        second_run.cancel()
        await asyncio.wait({second_run})


async def test_controllers_elect_one_leader_and_the_next_takes_over(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases
) -> None:
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    first, first_task = await start_controller(etcd_endpoints, key_prefix, "ctl-1")
    second, second_task = await start_controller(etcd_endpoints, key_prefix, "ctl-2")
    try:
        await store.create(vm_object("vm1"))
        placed = await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed")
        leader = await current_leader(store.client, f"{key_prefix}/leader/controller")
        assert leader is not None and placed.status.placement is not None
        assert placed.status.placement.token == leader.token
        assert first.is_leader != second.is_leader
        stopping, stopping_task = (first, first_task) if first.is_leader else (second, second_task)
        survivor = second if stopping is first else first
        await stop_controller(stopping, stopping_task)
        await eventually(lambda: survivor.is_leader, "the other to lead")
        await store.create(vm_object("vm2"))
        vm2 = await eventually(lambda: placed_on(store, "vm2", "a"), "vm2 placed by the new leader")
        assert vm2.status.placement is not None
        assert vm2.status.placement.token > placed.status.placement.token
    finally:
        for manager, task in ((first, first_task), (second, second_task)):
            if not task.done():
                await stop_controller(manager, task)


def test_heartbeat_timing_matches_the_engine() -> None:
    timing = heartbeat_timing(HaTimings())
    assert (timing.ttl, timing.renew_interval, timing.self_fence_margin) == (2, 0.5, 0.5)
    with pytest.raises(ValueError, match="whole number"):
        heartbeat_timing(HaTimings(lease_ttl=2.5))


async def test_every_loop_of_the_controller_shows_in_the_managers_telemetry(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases
) -> None:
    telemetry.setup_telemetry("kvmctl-test", "prometheus")
    try:
        await store.create(node_object("a"))
        await leases.hold("a")
        manager, task = await start_controller(etcd_endpoints, key_prefix, "ctl-telemetry")
        try:
            await store.create(
                VirtualMachineMigration(
                    metadata=ObjectMeta(name="to-nowhere"),
                    spec=VirtualMachineMigrationSpec(vm="vm9", target_node="z"),
                )
            )

            def counted() -> bool:
                metrics = prometheus_client.generate_latest().decode()
                return all(
                    f'kvmctl_reconcile_duration_seconds_count{{controller="{name}",kind="{kind}"'
                    in metrics
                    for name, kind in (
                        ("ha", "Cluster"),
                        ("migrations", "VirtualMachineMigration"),
                        ("fence-check", "ClusterNode"),
                    )
                )

            await eventually(counted, "the HA steps, migrations and fence checks measured")
            metrics = prometheus_client.generate_latest().decode()
            for name in ("migrations", "fence-check", "garbage-virtualmachine"):
                assert f'kvmctl_workqueue_depth{{name="{name}"' in metrics
        finally:
            await stop_controller(manager, task)
    finally:
        telemetry.setup_telemetry("kvmctl-test", "none")
