"""The VolumeGroup reconciler against real LVM on loop devices and a real etcd.

This kernel has no device-mapper: LVM runs with activation off (a private LVM_SYSTEM_DIR whose
lvm.conf says so) and only on the test's own loop devices (`--devices`). Activation and
exclusivity are tested in the kernel lab (e2e/lab_tests/test_lvm_lab.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.runtime.etcd_lock import LockTimeout
from controller.runtime.events import EventRecorder
from controller.runtime.reconcile import Blocked, record_not_ready
from controller.runtime.store import Store
from crds import Event, IscsiTarget, ObjectMeta, VirtualMachine, VolumeGroup
from crds.iscsitarget import IscsiTargetSpec
from crds.virtualmachine import VirtualMachineSpec
from crds.volumegroup import VolumeGroupSpec
from reconcilers.drivers.lvm import LvmError
from reconcilers.lv_claim import ActivationConflict, activate_for_vm, active_on
from reconcilers.lvm_lock import LvmSettings, metadata_lock
from reconcilers.volumegroup import VolumeGroupReconciler

NODE = "host1"
MIB = 1 << 20
LVM_CONF = """\
global { activation = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
backup { backup = 0 archive = 0 }
"""


@pytest.fixture
def loop_devices(make_loop_device: Callable[[int], str]) -> list[str]:
    """Two 64 MiB loop devices."""
    return [make_loop_device(64 * MIB) for _ in range(2)]


@pytest.fixture
def settings(tmp_path: Path, loop_devices: list[str]) -> LvmSettings:
    system_dir = tmp_path / "lvm"
    system_dir.mkdir()
    (system_dir / "lvm.conf").write_text(LVM_CONF)
    return LvmSettings(
        system_dir=str(system_dir),
        devices=tuple(loop_devices),
        lock_ttl=5,
        lock_timeout=2,
        by_path_dir=str(tmp_path / "by-path"),
    )


@pytest.fixture
def vg_name() -> str:
    return f"vg_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def reconciler(store: Store, settings: LvmSettings) -> VolumeGroupReconciler:
    return VolumeGroupReconciler(store, NODE, EventRecorder(store, "agent", NODE), settings)


def volume_group(vg_name: str, devices: list[str], lvs: dict[str, str]) -> VolumeGroup:
    return VolumeGroup(
        metadata=ObjectMeta(name="vg-cluster"),
        spec=VolumeGroupSpec.model_validate(
            {
                "vgName": vg_name,
                "physicalVolumes": [{"device": d} for d in devices],
                "logicalVolumes": [{"name": n, "size": s} for n, s in lvs.items()],
            }
        ),
    )


async def converge(store: Store, reconciler: VolumeGroupReconciler) -> VolumeGroup:
    """One reconcile as the agent's workers run it: a `Blocked` one is recorded on the object."""
    try:
        await reconciler.reconcile("vg-cluster")
    except Blocked as blocked:
        await record_not_ready(store, reconciler.recorder, "VolumeGroup", "vg-cluster", blocked)
    obj = await store.get("VolumeGroup", "vg-cluster")
    assert isinstance(obj, VolumeGroup)
    return obj


async def respec(store: Store, lvs: dict[str, str], devices: list[str] | None = None) -> None:
    obj = await store.get("VolumeGroup", "vg-cluster")
    assert isinstance(obj, VolumeGroup)
    fresh = volume_group(
        obj.spec.vg_name,
        devices if devices is not None else [pv.device or "" for pv in obj.spec.physical_volumes],
        lvs,
    )
    obj.spec = fresh.spec
    await store.update(obj)


def ready(obj: VolumeGroup) -> tuple[str, str, str]:
    condition = obj.status.condition("Ready")
    assert condition is not None
    return condition.status, condition.reason, condition.message


async def warnings(store: Store) -> list[str]:
    objects, _ = await store.list_objects("Event")
    return [e.spec.reason for e in objects if isinstance(e, Event) and e.spec.type == "Warning"]


async def lv_sizes(settings: LvmSettings, vg: str) -> dict[str, int]:
    return {lv.name: lv.size_bytes for lv in await settings.driver().lvs(vg)}


async def pv_owners(settings: LvmSettings) -> dict[str, str | None]:
    """Each PV's device -> its VG."""
    return {pv.name: pv.vg_name for pv in await settings.driver().pvs()}


async def test_vg_and_lvs_are_created_grown_and_reported(
    store: Store,
    reconciler: VolumeGroupReconciler,
    settings: LvmSettings,
    loop_devices: list[str],
    vg_name: str,
) -> None:
    await store.create(volume_group(vg_name, loop_devices[:1], {"lv_vm1": "8M", "lv_vm2": "12M"}))
    obj = await converge(store, reconciler)
    assert ready(obj)[:2] == ("True", "Converged")
    assert await lv_sizes(settings, vg_name) == {"lv_vm1": 8 * MIB, "lv_vm2": 12 * MIB}
    assert obj.status.size_bytes is not None and obj.status.free_bytes is not None
    assert obj.status.size_bytes - obj.status.free_bytes == 20 * MIB
    assert [(lv.name, lv.size_bytes, lv.active_on) for lv in obj.status.logical_volumes] == [
        ("lv_vm1", 8 * MIB, None),
        ("lv_vm2", 12 * MIB, None),
    ]
    assert (await converge(store, reconciler)).metadata.resource_version == (
        obj.metadata.resource_version
    )

    # Grow one LV and the VG onto the second device.
    await respec(store, {"lv_vm1": "16M", "lv_vm2": "12M"}, loop_devices)
    obj = await converge(store, reconciler)
    assert ready(obj)[0] == "True"
    assert await lv_sizes(settings, vg_name) == {"lv_vm1": 16 * MIB, "lv_vm2": 12 * MIB}
    assert await pv_owners(settings) == {d: vg_name for d in loop_devices}


async def test_shrink_is_refused_and_the_lv_keeps_its_size(
    store: Store,
    reconciler: VolumeGroupReconciler,
    settings: LvmSettings,
    loop_devices: list[str],
    vg_name: str,
) -> None:
    await store.create(volume_group(vg_name, loop_devices[:1], {"lv_vm1": "16M"}))
    await converge(store, reconciler)
    await respec(store, {"lv_vm1": "8M"})
    obj = await converge(store, reconciler)
    status, reason, message = ready(obj)
    assert (status, reason) == ("False", "ShrinkRefused")
    assert "lv_vm1" in message
    assert "ShrinkRefused" in await warnings(store)
    assert await lv_sizes(settings, vg_name) == {"lv_vm1": 16 * MIB}


async def test_an_lv_larger_than_the_free_space_creates_nothing(
    store: Store,
    reconciler: VolumeGroupReconciler,
    settings: LvmSettings,
    loop_devices: list[str],
    vg_name: str,
) -> None:
    await store.create(volume_group(vg_name, loop_devices[:1], {"lv_vm1": "8M"}))
    await converge(store, reconciler)
    await respec(store, {"lv_vm1": "8M", "small": "4M", "huge": "1G"})
    obj = await converge(store, reconciler)
    status, reason, message = ready(obj)
    assert (status, reason) == ("False", "InsufficientSpace")
    assert f"VG {vg_name} has" in message
    assert "InsufficientSpace" in await warnings(store)
    assert await lv_sizes(settings, vg_name) == {"lv_vm1": 8 * MIB}


async def test_an_lv_is_removed_only_when_no_vm_uses_it(
    store: Store,
    reconciler: VolumeGroupReconciler,
    settings: LvmSettings,
    loop_devices: list[str],
    vg_name: str,
) -> None:
    await store.create(volume_group(vg_name, loop_devices[:1], {"lv_vm1": "8M", "lv_vm2": "8M"}))
    await converge(store, reconciler)
    await store.create(
        VirtualMachine(
            metadata=ObjectMeta(name="vm1"),
            spec=VirtualMachineSpec.model_validate(
                {"memoryMiB": 64, "disks": [{"volume": f"{vg_name}/lv_vm1"}]}
            ),
        )
    )
    await respec(store, {})
    obj = await converge(store, reconciler)
    status, reason, message = ready(obj)
    assert (status, reason) == ("False", "LogicalVolumeInUse")
    assert f"{vg_name}/lv_vm1 (used by vm1)" in message
    assert await lv_sizes(settings, vg_name) == {"lv_vm1": 8 * MIB}

    await store.delete("VirtualMachine", "vm1")
    obj = await converge(store, reconciler)
    assert ready(obj)[0] == "True"
    assert await lv_sizes(settings, vg_name) == {}


async def test_missing_devices_and_unattached_iscsi_luns_change_nothing(
    store: Store,
    reconciler: VolumeGroupReconciler,
    settings: LvmSettings,
    loop_devices: list[str],
    vg_name: str,
) -> None:
    await store.create(
        IscsiTarget(
            metadata=ObjectMeta(name="storage"),
            spec=IscsiTargetSpec.model_validate(
                {"node": "storage1", "iqn": "iqn.2024-01.org.example:storage"}
            ),
        )
    )
    obj = volume_group(vg_name, loop_devices[:1], {"lv_vm1": "8M"})
    obj.spec = VolumeGroupSpec.model_validate(
        {
            "vgName": vg_name,
            "physicalVolumes": [
                {"device": loop_devices[0]},
                {"iscsi": {"target": "storage", "lun": 1}},
            ],
        }
    )
    await store.create(obj)
    status, reason, message = ready(await converge(store, reconciler))
    assert (status, reason) == ("False", "IscsiNotAttached")
    assert "not attached to host1" in message
    assert "ip-0.0.0.0:3260-iscsi-iqn.2024-01.org.example:storage-lun-1" in message
    assert await pv_owners(settings) == {}

    await respec(store, {}, [loop_devices[0], "/dev/absent-disk"])
    status, reason, message = ready(await converge(store, reconciler))
    assert (status, reason) == ("False", "DeviceMissing")
    assert await pv_owners(settings) == {}


async def test_a_device_of_another_vg_is_not_taken(
    store: Store,
    reconciler: VolumeGroupReconciler,
    settings: LvmSettings,
    loop_devices: list[str],
    vg_name: str,
) -> None:
    lvm = settings.driver()
    await lvm.pvcreate(loop_devices[1])
    await lvm.vgcreate(f"{vg_name}_other", [loop_devices[1]])
    await store.create(volume_group(vg_name, loop_devices, {}))
    status, reason, message = ready(await converge(store, reconciler))
    assert (status, reason) == ("False", "DeviceInUse")
    assert f"{loop_devices[1]} belongs to VG {vg_name}_other" in message
    assert vg_name not in [vg.name for vg in await lvm.vgs()]


async def test_one_host_at_a_time_holds_the_metadata_lock(
    store: Store, settings: LvmSettings, vg_name: str
) -> None:
    order: list[str] = []
    async with metadata_lock(store, vg_name, settings):
        order.append("first in")
        with pytest.raises(LockTimeout, match=f"metadata lock of VG {vg_name} stayed taken"):
            async with metadata_lock(store, vg_name, settings):
                order.append("never")

        async def second() -> None:
            async with metadata_lock(store, vg_name, LvmSettings(lock_timeout=30)):
                order.append("second in")

        waiter = asyncio.create_task(second())
        await asyncio.sleep(0)
        order.append("first out")
    await asyncio.wait_for(waiter, 30)
    assert order == ["first in", "first out", "second in"]


async def test_activation_claims_are_exclusive_and_rolled_back_on_failure(
    store: Store, settings: LvmSettings, loop_devices: list[str], vg_name: str
) -> None:
    """Activation itself needs device-mapper (kernel lab); here the claim around it."""
    lvm = settings.driver()
    await lvm.pvcreate(loop_devices[0])
    await lvm.vgcreate(vg_name, [loop_devices[0]])
    await lvm.lvcreate(vg_name, "lv_vm1", 8 * MIB)
    claim = f"{store.prefix}/lvm/activation/{vg_name}/lv_vm1".encode()
    await store.client.put(claim, b"host2")

    with pytest.raises(ActivationConflict, match=f"{vg_name}/lv_vm1 is active on host2"):
        await activate_for_vm(store, settings, vg_name, "lv_vm1", "host1")
    assert await active_on(store, vg_name, "lv_vm1") == "host2"

    # Taken over from a fenced host2; activation fails here (no device-mapper): rolled back.
    with pytest.raises(LvmError, match="lvchange"):
        await activate_for_vm(store, settings, vg_name, "lv_vm1", "host1", take_over_from="host2")
    assert await active_on(store, vg_name, "lv_vm1") is None
    [lv] = await lvm.lvs(vg_name)
    assert lv.tags == ()
