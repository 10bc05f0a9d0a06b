"""An iSCSI PV is named by its by-path link, but LVM reports the PV by the kernel's device name
(/dev/sdb for /dev/disk/by-path/ip-...-lun-1): the VolumeGroup reconciler must still see that
the device already is a PV of its VG (or of another VG) and converge again without pvcreate.

Real LVM on a loop device (activation off: this kernel has no device-mapper) and a real etcd.
The link stands in for the one open-iscsi's udev rule makes; it lives in a temp directory that
the test's lvm.conf adds to `devices/scan` (LVM only accepts links under the directories it
scans; the real /dev/disk/by-path is under /dev, which it scans by default).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.runtime.events import EventRecorder
from controller.runtime.reconcile import Blocked
from controller.runtime.store import Store
from crds import IscsiTarget, ObjectMeta, VolumeGroup
from crds.iscsitarget import IscsiTargetSpec
from crds.volumegroup import VolumeGroupSpec
from reconcilers.lvm_lock import LvmSettings
from reconcilers.volumegroup import VolumeGroupReconciler, iscsi_by_path

NODE = "host1"
MIB = 1 << 20
IQN = "iqn.2024-01.org.example:storage"
PORTAL = "127.0.0.1:3260"


@pytest.fixture
def loop_device(make_loop_device: Callable[[int], str]) -> str:
    return make_loop_device(64 * MIB)


@pytest.fixture
def by_path_link(tmp_path: Path, loop_device: str) -> str:
    by_path_dir = tmp_path / "by-path"
    by_path_dir.mkdir()
    link = iscsi_by_path(str(by_path_dir), PORTAL, IQN, 1)
    Path(link).symlink_to(loop_device)
    return link


@pytest.fixture
def settings(tmp_path: Path, by_path_link: str) -> LvmSettings:
    by_path_dir = str(Path(by_path_link).parent)
    system_dir = tmp_path / "lvm"
    system_dir.mkdir()
    (system_dir / "lvm.conf").write_text(
        "global { activation = 0 }\n"
        "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 "
        f'scan = [ "/dev", "{by_path_dir}" ] }}\n'
        "backup { backup = 0 archive = 0 }\n"
    )
    return LvmSettings(
        system_dir=str(system_dir),
        devices=(by_path_link,),
        lock_ttl=5,
        lock_timeout=10,
        by_path_dir=by_path_dir,
    )


async def converge(store: Store, reconciler: VolumeGroupReconciler) -> VolumeGroup:
    await reconciler.reconcile("vg-cluster")
    obj = await store.get("VolumeGroup", "vg-cluster")
    assert isinstance(obj, VolumeGroup)
    return obj


def ready(obj: VolumeGroup) -> tuple[str, str, str]:
    condition = obj.status.condition("Ready")
    assert condition is not None
    return condition.status, condition.reason, condition.message


async def test_a_pv_named_by_its_by_path_link_converges_again(
    store: Store, settings: LvmSettings, loop_device: str
) -> None:
    vg_name = f"vg_test_{uuid.uuid4().hex[:8]}"
    await store.create(
        IscsiTarget(
            metadata=ObjectMeta(name="storage"),
            spec=IscsiTargetSpec.model_validate({"node": "storage1", "iqn": IQN, "portal": PORTAL}),
        )
    )
    await store.create(
        VolumeGroup(
            metadata=ObjectMeta(name="vg-cluster"),
            spec=VolumeGroupSpec.model_validate(
                {
                    "vgName": vg_name,
                    "physicalVolumes": [{"iscsi": {"target": "storage", "lun": 1}}],
                    "logicalVolumes": [{"name": "lv_vm1", "size": "8M"}],
                }
            ),
        )
    )
    reconciler = VolumeGroupReconciler(store, NODE, EventRecorder(store, "agent", NODE), settings)
    lvm = settings.driver()
    try:
        first = await converge(store, reconciler)
        assert ready(first)[:2] == ("True", "Converged")
        assert [(pv.name, pv.vg_name) for pv in await lvm.pvs()] == [(loop_device, vg_name)]

        again = await converge(store, reconciler)
        assert ready(again)[:2] == ("True", "Converged"), ready(again)
        assert again.metadata.resource_version == first.metadata.resource_version

        # The same link in another VG's spec: refused as a device in use, nothing changed.
        other = VolumeGroup(
            metadata=ObjectMeta(name="vg-cluster"),
            spec=first.spec.model_copy(update={"vg_name": f"{vg_name}_other"}),
        )
        await store.delete("VolumeGroup", "vg-cluster")
        await store.create(other)
        with pytest.raises(Blocked) as refused:
            await reconciler.reconcile("vg-cluster")
        assert refused.value.reason == "DeviceInUse"
        assert f"{settings.devices[0]} belongs to VG {vg_name}" in refused.value.message
    finally:
        for vg in await lvm.vgs():
            for lv in await lvm.lvs(vg.name):
                await lvm.lvremove(vg.name, lv.name)
            await lvm.vgremove(vg.name)
