"""Exclusive disks and unique MACs across VMs: refused at `kvmctl apply` and at GitOps sync
(real etcd, nothing written), and never given two writers by the HA engine (hand-built worlds,
the simulator, and the production environment on a real etcd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.ha import scenario, scenario_run
from controller.ha.engine import Engine
from controller.ha.environment import Action, Emit, Place, SetDiskConflict, VmView
from controller.runtime.manager import Manager
from controller.runtime.store import Store
from e2e.harness.polling import eventually
from tests.support.cli import Run, write
from tests.support.gitrepo import MakeSyncer, Repository, vm_memory
from tests.support.ha import (
    Leases,
    events_of,
    get_vm,
    node_object,
    placed_on,
    report_running,
    vm_object,
)
from tests.support.views import node, vm, world

LV1 = {"volume": "vg_cluster/lv_vm1"}
ISO = {"file": "/srv/iso/install.iso", "readonly": True}
MAC = "52:54:00:00:00:01"


def vm_yaml(name: str, disks: list[dict[str, Any]], macs: tuple[str, ...] = ()) -> str:
    nics = [{"bridge": "br0", "mac": mac} for mac in macs]
    return (
        f"apiVersion: kvmctl.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n"
        f"spec: {{memoryMiB: 64, disks: {disks}, nics: {nics}}}\n---\n"
    )


SECRET = "apiVersion: kvmctl.io/v1alpha1\nkind: Secret\nmetadata: {name: s1}\nspec: {}\n---\n"


# kvmctl apply ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (
            vm_yaml("vm2", [{"file": "/dev/vg_cluster/lv_vm1"}]),
            "'vm2' and VirtualMachine 'vm1' (in the store) both use disk volume vg_cluster/lv_vm1",
        ),
        (vm_yaml("vm2", [{**LV1, "readonly": True}]), "every VM using it has it readonly"),
        (vm_yaml("vm2", [], (MAC,)), "both use MAC address 52:54:00:00:00:01"),
        (
            vm_yaml("vm2", [{"file": "/srv/b.img"}]) + vm_yaml("vm3", [{"file": "/srv/b.img"}]),
            "'vm3' and VirtualMachine 'vm2' (in this apply) both use disk file /srv/b.img",
        ),
    ],
    ids=["same-lv-as-device-path", "readonly-beside-a-writer", "same-mac", "within-the-batch"],
)
@pytest.mark.parametrize("dry_run", ["none", "server"])
def test_apply_refuses_a_shared_disk_or_mac_and_writes_nothing(
    kvmctl: Run, tmp_path: Path, second: str, expected: str, dry_run: str
) -> None:
    first = write(tmp_path, vm_yaml("vm1", [LV1, ISO], (MAC,)), "vm1.yaml")
    assert kvmctl("apply", "-f", first)[0] == 0
    _, before, _ = kvmctl("get", "vm", "-o", "yaml")
    batch = write(tmp_path, SECRET + second)
    code, out, err = kvmctl("apply", "-f", batch, f"--dry-run={dry_run}")
    assert (code, out) == (1, "")
    assert expected in err and err.endswith("; nothing was applied\n")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert kvmctl("get", "secret", "s1")[0] == 1  # written before VMs in apply order: not even it
    assert kvmctl("get", "vm", "-o", "yaml")[1] == before


def test_apply_allows_shared_readonly_images_and_reapplying_a_vm(
    kvmctl: Run, tmp_path: Path
) -> None:
    first = write(tmp_path, vm_yaml("vm1", [LV1, ISO], (MAC,)), "vm1.yaml")
    assert kvmctl("apply", "-f", first)[0] == 0
    changed = vm_yaml("vm1", [LV1, ISO, {"file": "/srv/extra.img"}], (MAC,))
    others = vm_yaml("vm2", [{"volume": "vg_cluster/lv_vm2"}, ISO], ("52:54:00:00:00:02",))
    code, out, err = kvmctl("apply", "-f", write(tmp_path, changed + others))
    assert code == 0, err
    assert out.splitlines() == ["virtualmachine/vm1 configured", "virtualmachine/vm2 created"]


# GitOps ---------------------------------------------------------------------------------------


async def test_gitsync_refuses_a_shared_disk_but_not_a_rename_it_prunes(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_yaml("vm1", [LV1]))
    await repo.commit("vm1")
    syncer = make_syncer()
    assert (await syncer.sync()).ok

    # vm1 renamed vm1b: vm1 is pruned by the same sync, so its disk is free for vm1b.
    repo.write("clusters/lab/vms.yaml", vm_yaml("vm1b", [LV1]))
    await repo.commit("rename vm1 to vm1b")
    result = await syncer.sync()
    assert result.ok, result.message
    assert [e.name for e in result.pruned] == ["vm1"]

    # A VM made by hand, outside Git, holds a disk the next commit wants.
    await store.create(vm_object("manual", disks=[{"volume": "vg_cluster/lv_vm9"}]))
    repo.write("clusters/lab/more.yaml", vm_yaml("vm9", [{"volume": "vg_cluster/lv_vm9"}]))
    await repo.commit("vm9")
    result = await syncer.sync()
    assert (result.ok, result.reason) == (False, "InvalidManifest")
    assert "nothing applied" in result.message
    assert "'vm9' and VirtualMachine 'manual' (in the store) both use disk volume" in result.message
    assert await vm_memory(store, "vm9") is None


# The engine on hand-built worlds ---------------------------------------------------------------


def shared(name: str, placement: str | None = None, state: str = "Running", **spec: Any) -> VmView:
    spec.setdefault("disks", [LV1])
    return vm(name, placement, state, **spec)


def places(actions: list[Action]) -> dict[str, str | None]:
    return {a.vm: a.node for a in actions if isinstance(a, Place)}


def conflict_warnings(actions: list[Action]) -> dict[str, str]:
    return {
        a.name: a.message
        for a in actions
        if isinstance(a, Emit) and (a.reason, a.type) == ("DiskConflict", "Warning")
    }


def test_a_vm_on_a_disk_another_holds_stays_pending_until_it_is_free() -> None:
    engine = Engine()
    w = world([node("a"), node("b")], [shared("vm1", "a"), shared("vm2", state="Stopped")])
    actions = engine.step(w)
    assert places(actions) == {}
    (message,) = conflict_warnings(actions).values()
    assert "disk volume vg_cluster/lv_vm1 is in use by vm1" in message
    assert SetDiskConflict("vm2", message) in actions
    first_event = next(i for i, a in enumerate(actions) if isinstance(a, Emit))
    assert actions.index(SetDiskConflict("vm2", message)) < first_event, "condition first"

    # Recorded already: nothing new is said while the conflict lasts.
    waiting = shared("vm2", state="Stopped")
    waiting = VmView(**{**waiting.__dict__, "disk_conflict": message})
    assert engine.step(world([node("a"), node("b")], [shared("vm1", "a"), waiting])) == []

    # vm1 is stopped and gone from its node: vm2 is placed and the condition cleared.
    stopped = shared("vm1", state="Stopped", runState="stopped")
    actions = engine.step(world([node("a"), node("b")], [stopped, waiting]))
    assert places(actions) == {"vm2": "a"}
    assert SetDiskConflict("vm2", None) in actions


def test_readonly_images_are_shared_and_only_readonly() -> None:
    iso_only = [shared("vm1", "a", disks=[ISO]), shared("vm2", disks=[ISO])]
    assert places(Engine().step(world([node("a")], iso_only))) == {"vm2": "a"}
    writer = [shared("vm1", "a", disks=[ISO]), shared("vm2", disks=[{**ISO, "readonly": False}])]
    actions = Engine().step(world([node("a")], writer))
    assert places(actions) == {} and "vm2" in conflict_warnings(actions)


def test_two_vms_recovered_from_a_fenced_node_never_share_a_disk() -> None:
    lost = node("a", health="Fenced", lease=False)
    vms = [shared("vm1", "a", priority=1), shared("vm2", "a", priority=5), shared("vm3", "a")]
    actions = Engine().step(world([lost, node("b")], vms))
    assert places(actions) == {"vm2": "b", "vm1": None, "vm3": None}
    assert sorted(conflict_warnings(actions)) == ["vm1", "vm3"]
    assert "in use by vm2" in conflict_warnings(actions)["vm1"]


def test_a_second_writer_in_a_hand_written_store_is_unplaced() -> None:
    """Both placed: the one already running keeps the disk, whatever the priorities."""
    vms = [shared("vm1", "a"), shared("vm2", "b", state="Stopped", priority=100)]
    actions = Engine().step(world([node("a"), node("b")], vms))
    assert places(actions) == {"vm2": None}
    assert "in use by vm1" in conflict_warnings(actions)["vm2"]


def test_a_crashed_vm_awaiting_its_restart_keeps_its_disk() -> None:
    crashed = VmView(**{**shared("vm1", "a", state="Crashed").__dict__, "crashed_at": 5.0})
    actions = Engine().step(world([node("a"), node("b")], [crashed, shared("vm2")]))
    assert places(actions) == {} and "vm2" in conflict_warnings(actions)


# The simulator ---------------------------------------------------------------------------------

SCENARIO = """
duration: 5
nodes: [{name: host1, fencing: {selfFence: true}}, {name: host2, fencing: {selfFence: true}}]
vms:
  - {name: vm1, node: host1, memoryMiB: 64, disks: [{volume: vg/lv1}]}
  - {name: vm2, node: host2, memoryMiB: 64, priority: 9, disks: [{file: /dev/vg/lv1}]}
"""


async def test_the_simulator_flags_two_writers_and_the_engine_stops_the_second(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hand-written.yaml"
    path.write_text(SCENARIO)
    sim = await scenario_run.run_scenario(scenario.load(path))
    assert sim.violations == ["0.0: vm1 and vm2 both run on disk volume vg/lv1"]
    # Both run: the higher priority keeps the disk.
    assert (sim.vms["vm1"].placement, sim.vms["vm2"].placement) == (None, "host2")
    assert (sim.running_hosts("vm1"), sim.running_hosts("vm2")) == ([], ["host2"])
    assert "in use by vm2" in (sim.vms["vm1"].disk_conflict or "")


# The production environment on a real etcd ---------------------------------------------------


async def test_controller_leaves_the_second_vm_pending_with_a_warning_and_condition(
    store: Store, leases: Leases, controller: Manager
) -> None:
    for name in ("a", "b"):
        await store.create(node_object(name))
        await leases.hold(name)
    await store.create(vm_object("vm1", disks=[LV1]))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")
    # Written straight to the store, as by hand or by an older kvmctl: apply would refuse it.
    await store.create(vm_object("vm2", disks=[{"file": "/dev/vg_cluster/lv_vm1"}]))

    async def warned() -> list[str]:
        events = await events_of(store, "VirtualMachine", "vm2")
        return [e.spec.message for e in events if e.spec.reason == "DiskConflict"]

    (message,) = await eventually(warned, "a DiskConflict warning about vm2")
    assert "disk volume vg_cluster/lv_vm1 is in use by vm1" in message
    pending = await get_vm(store, "vm2")
    assert pending.status.placement is None
    condition = pending.status.condition("DiskConflict")
    assert condition is not None and (condition.status, condition.message) == ("True", message)

    assert await store.delete("VirtualMachine", "vm1") is None
    await eventually(lambda: placed_on(store, "vm2", "a"), "vm2 placed once vm1 is gone")

    async def cleared() -> bool:
        return (await get_vm(store, "vm2")).status.condition("DiskConflict") is None

    await eventually(cleared, "vm2's DiskConflict condition cleared")
