"""kvmctl's cluster commands against a real etcd and a running HA controller: node drain and
uncordon, fence ack, status, get leader, and bad input to `kvmctl controller`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from controller.cli.drain import Blockers
from controller.cli.status_checks import DEGRADED, NO_LEADER, NO_QUORUM
from controller.cli.vm import ProgressBar
from controller.ha import requests
from controller.runtime.events import EventRecorder
from controller.runtime.manager import Manager
from controller.runtime.store import Store
from crds import Event, VirtualMachineMigration
from crds.clusternode import Capacity, FenceRecord
from crds.meta import now
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually
from tests.support.cli import Kvmctl
from tests.support.ha import (
    Leases,
    get_node,
    node_object,
    placed_on,
    reasons,
    report_running,
    vm_object,
)


async def two_nodes_with_vms(store: Store, leases: Leases) -> None:
    """Nodes a and b online; vm1 (may live-migrate) and vm2 (may not) running on a."""
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")

    async def both_online() -> bool:  # until then the engine may still see b's lease missing
        nodes = [await get_node(store, name) for name in ("a", "b")]
        return all(node.status.health == "Online" for node in nodes)

    await eventually(both_online, "a and b Online")
    await store.create(vm_object("vm1"))
    await store.create(vm_object("vm2", migration={"allowed": False}))
    for vm in ("vm1", "vm2"):

        async def placed(vm: str = vm) -> object:
            return await placed_on(store, vm, "a")

        await eventually(placed, f"{vm} placed on a")
        await report_running(store, vm, "a")


async def test_drain_migrates_what_it_can_and_reports_the_rest(
    store: Store, leases: Leases, controller: Manager, kvmctl_thread: Kvmctl
) -> None:
    await two_nodes_with_vms(store, leases)

    code, out, err = await kvmctl_thread("node", "drain", "a")
    assert code == 0, err
    assert "clusternode/a cordoned; draining 2 VMs" in out
    assert "virtualmachine/vm2 stays on a: live migration is not allowed" in out
    assert (await get_node(store, "a")).spec.cordoned

    async def drain_migration() -> VirtualMachineMigration | None:
        migrations, _ = await store.list_objects("VirtualMachineMigration")
        for migration in migrations:
            if isinstance(migration, VirtualMachineMigration) and migration.spec.vm == "vm1":
                return migration
        return None

    migration = await eventually(drain_migration, "a migration of vm1")
    assert migration.spec.target_node == "b"
    assert migration.metadata.labels == {"kvmctl.io/requested-by": "ha-controller"}

    async def reported() -> bool:
        return "VMNotMigratable" in await reasons(store, "VirtualMachine", "vm2")

    await eventually(reported, "vm2 reported as not migratable")
    assert await placed_on(store, "vm2", "a") is not None

    # Once only VMs that may not leave are left, --wait ends at once and names them.
    def moved_to_b(vm: Any) -> bool:  # what the migration controller writes after success
        vm.status.placement = vm.status.placement.model_copy(update={"node": "b"})
        return True

    await store.patch_status("VirtualMachine", "vm1", moved_to_b)
    code, out, err = await kvmctl_thread("node", "drain", "a", "--wait", "--timeout", "30")
    assert code == 1
    assert "a not drained: vm2: live migration is not allowed (--force stops it" in err

    code, out, err = await kvmctl_thread("node", "uncordon", "a")
    assert code == 0, err
    assert out.strip() == "clusternode/a uncordoned"
    assert not (await get_node(store, "a")).spec.cordoned
    assert await requests.read_drain(store, "a") is None


async def test_drain_request_survives_apply_of_the_node_manifest(
    store: Store, kvmctl_thread: Kvmctl
) -> None:
    await store.create(node_object("a"))
    code, _, err = await kvmctl_thread("node", "drain", "a", "--force")
    assert code == 0, err
    node = await get_node(store, "a")
    node.spec.cordoned = False  # what `kvmctl apply` of the original manifest does
    await store.update(node)
    request = await requests.read_drain(store, "a")
    assert request is not None and request.mode == "force"


async def test_fence_ack_only_for_a_lost_node(
    store: Store, leases: Leases, controller: Manager, kvmctl_thread: Kvmctl
) -> None:
    await store.create(node_object("a"))
    await leases.hold("a")

    async def online() -> bool:
        return (await get_node(store, "a")).status.health == "Online"

    await eventually(online, "a Online")
    code, _, err = await kvmctl_thread("fence", "ack", "a")
    assert code == 1
    assert "a is Online: an acknowledgement only counts while the node is lost" in err
    code, _, err = await kvmctl_thread("fence", "ack", "nowhere")
    assert code == 1 and "ClusterNode 'nowhere' not found" in err
    code, _, err = await kvmctl_thread("fence", "ack", "Bad_Name")
    assert code == 2 and "DNS-1123" in err


async def test_status_and_get_leader(
    store: Store, leases: Leases, controller: Manager, kvmctl_thread: Kvmctl
) -> None:
    await two_nodes_with_vms(store, leases)

    async def checked() -> tuple[int, str] | None:
        code, out, _ = await kvmctl_thread("status", "--check")
        return (code, out.strip()) if code == 0 else None  # until vm2 runs: not placed yet

    healthy = "OK: etcd 1/1 members healthy, leader ctl-1, 2 nodes, 2 VMs"
    assert await eventually(checked, "status --check OK") == (0, healthy)
    await leases.drop("b")

    async def b_offline() -> bool:
        return (await get_node(store, "b")).status.health == "Offline"

    await eventually(b_offline, "b Offline (nothing placed there)")
    code, out, err = await kvmctl_thread("status", "--check")
    assert (code, out.strip()) == (DEGRADED, "DEGRADED: node b is Offline"), err
    code, out, err = await kvmctl_thread("status", "--check", "--watch")
    assert code == 2 and out == "" and "not allowed with argument" in err
    code, out, err = await kvmctl_thread("status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "etcd: quorum, 1/1 members healthy"
    assert lines[2].split()[2:4] == ["healthy", "leader"]
    leader = next(line for line in lines if line.startswith("Leader: "))
    assert leader.startswith("Leader: ctl-1 since ") and ", term " in leader
    nodes = {line.split()[0]: line.split()[1:5] for line in lines if line.startswith(("a ", "b "))}
    assert nodes["b"] == ["Offline", "lost", "enabled", "0"]
    health, heartbeat, scheduling, placed = nodes["a"]
    assert (health, scheduling, placed) == ("Online", "enabled", "2")
    assert heartbeat.endswith("s") and int(heartbeat[:-1]) <= 3  # seconds since the renewal
    vm_lines = [line.split()[:4] for line in lines if line.startswith("vm") and "%" not in line]
    assert vm_lines == [["vm1", "started", "a", "Running"], ["vm2", "started", "a", "Running"]]

    code, out, err = await kvmctl_thread("status", "-o", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["etcd"]["quorum"] and report["leader"]["identity"] == "ctl-1"
    assert [n["heartbeatAgeSeconds"] is None for n in report["nodes"]] == [False, True]
    assert report["problems"] == [] and report["degraded"] == ["node b is Offline"]

    code, out, err = await kvmctl_thread("get", "leader")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["IDENTITY", "SINCE", "AGE", "TOKEN"]
    assert row.split()[0] == "ctl-1"
    code, out, _ = await kvmctl_thread("get", "leader", "-o", "name")
    assert out.strip() == "ctl-1"


async def record_warning(store: Store, vm: str, reason: str, message: str) -> None:
    await store.create(
        Event.model_validate(
            {
                "metadata": {"name": f"{vm}-{reason.lower()}"},
                "spec": {
                    "involvedObject": {"kind": "VirtualMachine", "name": vm},
                    "reason": reason,
                    "type": "Warning",
                    "message": message,
                    "source": {"component": "test"},
                },
            }
        )
    )


async def test_get_leader_without_controller(kvmctl_thread: Kvmctl) -> None:
    code, out, err = await kvmctl_thread("get", "leader")
    assert code == 1 and out == "" and "No leader." in err


async def test_status_exit_codes_without_leader_and_with_every_node_lost(
    store: Store, leases: Leases, kvmctl_thread: Kvmctl
) -> None:
    """Also migrations in flight, warnings and a node's fence record (no controller here to act
    on them)."""
    await store.create(
        VirtualMachineMigration.model_validate(
            {"metadata": {"name": "vm1-x"}, "spec": {"vm": "vm1", "targetNode": "b"}}
        )
    )
    await record_warning(store, "vm2", "VMNotMigratable", "b has 0 free vcpus")
    code, out, err = await kvmctl_thread("status")
    assert code == NO_LEADER, err
    assert "Leader: none" in out and "PROBLEM: no controller leads" in out
    lines = out.splitlines()
    assert any(line.split()[:6] == ["vm1-x", "vm1", "-", "b", "Pending", "0%"] for line in lines)
    assert any("VMNotMigratable" in line and "b has 0 free vcpus" in line for line in lines)
    await store.create(node_object("a"))
    code, out, _ = await kvmctl_thread("status", "-o", "json")
    assert code == NO_LEADER
    assert json.loads(out)["problems"] == [
        "no controller leads",
        "all 1 nodes are lost (no heartbeat)",
    ]
    await leases.hold("a")
    code, out, _ = await kvmctl_thread("status", "-o", "json")
    assert code == NO_LEADER and json.loads(out)["problems"] == ["no controller leads"]

    def fenced(node: Any) -> bool:  # as the controller records a power fence
        node.status.fence = FenceRecord(method="ipmi", confirmed_at=now(), how="PowerOff")
        return True

    await store.patch_status("ClusterNode", "a", fenced)
    code, out, _ = await kvmctl_thread("status", "-o", "json")
    (fence,) = [n["fence"] for n in json.loads(out)["nodes"]]
    assert (fence["how"], fence["method"]) == ("PowerOff", "ipmi") and fence["confirmedAt"]
    code, out, _ = await kvmctl_thread("status")
    (row,) = [line for line in out.splitlines() if line.startswith("a ")]
    assert row.split()[5:7] == ["PowerOff", "(ipmi)"] and row.endswith("s ago"), row


def test_status_without_quorum_names_each_member() -> None:
    """A 3-member etcd with 1 member killed (`--check`: degraded) and 2 (exit NO_QUORUM, each
    member's health shown)."""
    cluster = EtcdCluster(size=3).start()
    try:
        env = {**os.environ, "KVMCTL_ETCD": ",".join(cluster.endpoints), "KVMCTL_CONFIG": ""}
        command = [sys.executable, "-m", "controller.cli", "status"]
        healthy = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert healthy.returncode == NO_LEADER, healthy.stderr
        assert healthy.stdout.startswith("etcd: quorum, 3/3 members healthy")
        first, second = cluster.members[1:]
        first.kill()  # by the PID of the etcd this test started
        for survivor in (cluster.members[0], second):
            survivor.wait_healthy()  # they have a leader again, if `first` was it
        check = subprocess.run(
            [*command, "--check"], env=env, capture_output=True, text=True, timeout=120
        )
        assert check.returncode == NO_LEADER, check.stderr
        assert (
            check.stdout
            == f"DEGRADED: no controller leads; etcd member {first.name} is unhealthy\n"
        )
        second.kill()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == NO_QUORUM, result.stderr
        assert result.stdout.startswith("etcd: NO QUORUM, 0/3 members healthy")
        assert "PROBLEM: etcd has no quorum" in result.stdout
        assert "Traceback" not in result.stderr
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--watchdog-timeout", "3"], "watchdog_timeout (3.0s) must not exceed"),
        (["--election-ttl", "1"], "leader election ttl must be at least 2 s"),
    ],
)
async def test_controller_refuses_bad_timings(
    kvmctl_thread: Kvmctl, argv: list[str], message: str
) -> None:
    code, _, err = await kvmctl_thread("controller", "--metrics-port", "0", *argv)
    assert code == 1
    assert message in err and "Traceback" not in err


async def test_drain_wait_streams_why_a_vm_cannot_leave_and_times_out_naming_it(
    store: Store, leases: Leases, controller: Manager, kvmctl_thread: Kvmctl
) -> None:
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    for name in ("a", "b"):
        await leases.hold(name)

    def small(node: Any) -> bool:  # what b's agent reports: 1 cpu
        node.status.capacity = Capacity(cpus=1, memory_mib=4096)
        return True

    await store.as_writer("node.b").patch_status("ClusterNode", "b", small)

    async def both_online() -> bool:
        nodes = [await get_node(store, name) for name in ("a", "b")]
        return all(node.status.health == "Online" for node in nodes)

    await eventually(both_online, "a and b Online")
    await store.create(vm_object("vm1", vcpus=2))

    async def on_a() -> object:
        return await placed_on(store, "vm1", "a")

    await eventually(on_a, "vm1 placed on a")
    await report_running(store, "vm1", "a")

    code, out, err = await kvmctl_thread("node", "drain", "a", "--wait", "--timeout", "120")
    assert code == 1, out + err
    why = "VMNotMigratable: cannot leave a: b has 1 free vcpus of 2 needed"
    assert f"virtualmachine/vm1: {why}" in out  # streamed as the controller wrote it
    assert err.strip() == f"error: a not drained: vm1: {why}"
    # Run again with nothing changed: the blocker (reported once) still ends the wait.
    code, out, err = await kvmctl_thread("drain", "a", "--wait", "--timeout", "10")
    assert code == 1 and err.strip() == f"error: a not drained: vm1: {why}", out + err

    # b grows: the drain starts a migration no agent carries out; --timeout ends the wait.
    def big(node: Any) -> bool:
        node.status.capacity = Capacity(cpus=8, memory_mib=4096)
        return True

    await store.as_writer("node.b").patch_status("ClusterNode", "b", big)

    async def migrating() -> bool:
        return "VMMigrating" in await reasons(store, "VirtualMachine", "vm1")

    await eventually(migrating, "the controller migrating vm1 to b")
    (migration,) = [
        m
        for m in (await store.list_objects("VirtualMachineMigration"))[0]
        if isinstance(m, VirtualMachineMigration)
    ]
    draining = asyncio.ensure_future(kvmctl_thread("drain", "a", "--wait", "--timeout", "10"))

    def running(current: Any) -> bool:  # what a's agent reports while it migrates vm1
        current.status.phase = "Running"
        current.status.progress_percent = 25
        current.status.data_processed_bytes = 1 << 30
        current.status.data_remaining_bytes = 3 << 30
        return True

    # Before or after the drain lists the migrations: either way it shows the report.
    await store.as_writer("node.a").patch_status(
        "VirtualMachineMigration", migration.metadata.name, running
    )
    code, out, err = await asyncio.wait_for(draining, 120)
    assert code == 1, out + err
    assert "virtualmachine/vm1: [#####" in out and "  25%  Running  3.0Gi left" in out, out
    assert err.strip() == "error: a not drained after 10 s; still there: vm1 (not moved yet)"


async def test_cordon_shortcuts_and_global_flags_after_the_command(
    store: Store, kvmctl_thread: Kvmctl, etcd_endpoints: list[str]
) -> None:
    await store.create(node_object("a"))
    code, out, err = await kvmctl_thread(
        "cordon", "a", "--etcd", etcd_endpoints[0], "--prefix", store.prefix, "--etcd-timeout", "5"
    )
    assert (code, out.strip()) == (0, "clusternode/a cordoned"), err
    assert (await get_node(store, "a")).spec.cordoned
    assert await requests.read_drain(store, "a") is None  # cordon does not drain
    code, out, _ = await kvmctl_thread("uncordon", "a")
    assert (code, out.strip()) == (0, "clusternode/a uncordoned")
    assert not (await get_node(store, "a")).spec.cordoned
    code, _, err = await kvmctl_thread("cordon", "nowhere")
    assert code == 1 and err.strip() == "error: ClusterNode 'nowhere' not found"


async def test_migrate_wait_timeout_goes_to_stderr(store: Store, kvmctl_thread: Kvmctl) -> None:
    """No controller runs: the migration stays Pending until --timeout."""
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await store.create(vm_object("vm1"))
    code, out, err = await kvmctl_thread("migrate", "vm1", "--to", "b", "--wait", "--timeout", "1")
    assert code == 1
    name = out.split()[0].removeprefix("virtualmachinemigration/")
    assert err.splitlines()[-1] == (
        f"error: migration {name} did not end within 1 s (still Pending, 0%)"
    )


async def test_migrate_wait_streams_events_and_names_why_at_the_timeout(
    store: Store, kvmctl_thread: Kvmctl
) -> None:
    """No controller runs; an Event about the migration, written while it waits, is streamed
    and named as the reason it did not end."""
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await store.create(vm_object("vm1"))
    waiting = asyncio.ensure_future(
        kvmctl_thread("migrate", "vm1", "--to", "b", "--wait", "--timeout", "10")
    )

    async def created() -> VirtualMachineMigration | None:
        found = (await store.list_objects("VirtualMachineMigration"))[0]
        return next((m for m in found if isinstance(m, VirtualMachineMigration)), None)

    migration = await eventually(created, "the migration created")
    recorder = EventRecorder(store, "test")
    await recorder.record(migration, "Warning", "MigrationBlocked", "no controller leads")
    code, out, err = await asyncio.wait_for(waiting, 120)
    name = migration.metadata.name
    assert code == 1
    assert f"virtualmachinemigration/{name}: MigrationBlocked: no controller leads" in out, out
    assert err.splitlines()[-1] == (
        f"error: migration {name} did not end within 10 s (still Pending, 0%: no controller leads)"
    )


def test_migration_progress_shows_bytes_left_and_rate() -> None:
    moments = iter([10.0, 12.0])
    bar = ProgressBar(io.StringIO(), clock=lambda: next(moments))
    migration = VirtualMachineMigration.model_validate(
        {"metadata": {"name": "m"}, "spec": {"vm": "vm1", "targetNode": "b"}}
    )
    migration.status.phase = "Running"
    migration.status.progress_percent = 40
    migration.status.data_remaining_bytes = 3 << 30
    migration.status.data_processed_bytes = 1 << 30
    assert bar.line(migration).endswith(" 40%  Running  3.0Gi left")  # no rate from one sample
    migration.status.data_processed_bytes = (1 << 30) + (200 << 20)
    migration.status.data_remaining_bytes = (3 << 30) - (200 << 20)
    assert bar.line(migration).endswith(" 40%  Running  2.8Gi left  100.0Mi/s")


async def test_wait_for_a_condition_a_field_and_deletion(
    store: Store, kvmctl_thread: Kvmctl
) -> None:
    await store.create(vm_object("vm1"))
    code, _, err = await kvmctl_thread("wait", "--for=condition=Ready", "vm/vm1", "--timeout", "1")
    assert code == 1
    assert err.strip() == (
        "error: timed out after 1 s waiting for condition=Ready: virtualmachine/vm1 "
        "(no Ready condition)"
    )
    waiting = asyncio.ensure_future(
        kvmctl_thread("wait", "vm", "vm1", "--for", "condition=Ready", "--timeout", "120")
    )

    def ready(vm: Any) -> bool:
        return bool(vm.status.set_condition("Ready", "True", "Running", "up"))

    async def seen_not_ready() -> bool:  # the waiter has read vm1 (a condition-less Event)
        await asyncio.sleep(0)
        return not waiting.done()

    await eventually(seen_not_ready, "the waiter running")
    await store.patch_status("VirtualMachine", "vm1", ready)
    code, out, err = await asyncio.wait_for(waiting, 120)
    assert (code, out.strip()) == (0, "virtualmachine/vm1 condition met"), err

    code, out, _ = await kvmctl_thread(
        "wait", "--for=jsonpath={.status.conditions[0].reason}=Running", "vm/vm1"
    )
    assert code == 0
    code, _, err = await kvmctl_thread(
        "wait", "--for=jsonpath={.spec.vcpus}=4", "vm/vm1", "--timeout", "1"
    )
    assert code == 1 and err.strip().endswith("virtualmachine/vm1 (1)")
    deleting = asyncio.ensure_future(
        kvmctl_thread("wait", "--for=delete", "vm/vm1", "--timeout", "120")
    )
    await store.delete("VirtualMachine", "vm1")
    code, out, err = await asyncio.wait_for(deleting, 120)
    assert (code, out.strip()) == (0, "virtualmachine/vm1 deleted"), err
    for bad in (["--for=ready", "vm/vm1"], ["--for=condition=Ready", "vm"], ["vm/vm1"]):
        code, out, err = await kvmctl_thread("wait", *bad)
        assert code == 2 and out == "" and len(err.strip().splitlines()) <= 2, bad


def test_a_blocker_reported_before_the_drain_counts_only_once_settled() -> None:
    now = [100.0]
    blockers = Blockers(force=False, settle=5.0, clock=lambda: now[0])
    vm = vm_object("vm1")

    def event(reason: str, minute: int) -> Event:
        return Event.model_validate(
            {
                "metadata": {"name": f"vm1-{reason.lower()}"},
                "spec": {
                    "involvedObject": {"kind": "VirtualMachine", "name": "vm1"},
                    "reason": reason,
                    "message": "cannot leave a: b has 0 free vcpus of 2 needed",
                    "source": {"component": "test"},
                    "lastTimestamp": f"2026-01-01T00:{minute:02d}:00Z",
                },
            }
        )

    blockers.saw(event("VMNotMigratable", 1), fresh=False)
    assert blockers.why(vm) is None  # the controller may act on this drain first
    assert blockers.why(vm, stale_too=True) == (
        "VMNotMigratable: cannot leave a: b has 0 free vcpus of 2 needed"
    )
    now[0] += 5.0
    assert blockers.why(vm) is not None  # nothing newer: it still holds
    blockers.saw(event("VMMigrating", 2), fresh=True)
    assert blockers.why(vm) is None
    blockers.saw(event("VMNotMigratable", 3), fresh=True)
    assert blockers.why(vm) is not None
    stays = vm_object("vm2", migration={"allowed": False})
    assert "live migration is not allowed" in (blockers.why(stays) or "")
    assert Blockers(force=True).why(stays) is None
