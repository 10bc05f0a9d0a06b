"""A VolumeGroup whose PV is an iSCSI LUN, end to end under Debian's kernel (SCSI present).

A real tgtd (started by `TgtdSupervisor`, configured by the IscsiTarget reconciler) exports a
file-backed LUN on loopback; the real open-iscsi initiator (iscsid + iscsiadm, kernel iscsi_tcp)
logs in and the kernel attaches it as /dev/sdX; the VolumeGroup reconciler, given the PV as
`iscsi: {target, lun}`, builds the VG and LV on it, and the activation contract activates the LV
through device-mapper. Everything started is stopped by its PID; the session is logged out.

The lab has no udev, so the test makes the /dev/disk/by-path link open-iscsi's udev rule would
make, in a temp directory used as the node's `by_path_dir`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from controller.runtime.events import EventRecorder
from controller.runtime.store import Store
from crds import IscsiTarget, VolumeGroup
from e2e.harness.iscsi_lab import (
    DEADLINE,
    INITIATOR,
    IQN,
    ISCSI_ERR_NO_OBJS_FOUND,
    LUN,
    LV,
    MIB,
    NODE,
    converge,
    logged_in,
    lvm_settings,
    ready,
    run,
    serve_target,
    volume_group,
    write_through,
)
from e2e.harness.polling import eventually
from reconcilers.lv_claim import activate_for_vm, deactivate
from reconcilers.tgtd_supervisor import TgtdSupervisor
from reconcilers.volumegroup import VolumeGroupReconciler, iscsi_by_path


async def test_a_vg_on_an_iscsi_lun_from_login_to_an_active_lv(
    tmp_path: Path,
    backing_store: Path,
    store: Store,
    tgtd: TgtdSupervisor,
    iscsid: asyncio.subprocess.Process,
) -> None:
    targets = await serve_target(store, tgtd, backing_store)

    vg = f"vg_lab_{uuid.uuid4().hex[:6]}"
    async with logged_in(IQN, tgtd.portal) as disk:
        try:
            await targets.reconcile("vg-cluster")
            target = await store.get("IscsiTarget", "vg-cluster")
            assert isinstance(target, IscsiTarget)
            assert [s.split()[0] for s in target.status.sessions] == [INITIATOR]

            # Stands in for open-iscsi's udev rule (the lab has no udev).
            by_path_dir = tmp_path / "by-path"
            by_path_dir.mkdir()
            link = iscsi_by_path(str(by_path_dir), tgtd.portal, IQN, LUN)
            await asyncio.to_thread(os.symlink, disk, link)
            settings = lvm_settings(tmp_path, link)
            lvm = settings.driver()
            reconciler = VolumeGroupReconciler(
                store, NODE, EventRecorder(store, "agent", NODE), settings
            )

            await store.create(volume_group(vg, {LV: "8M"}))
            obj = await converge(store, reconciler)
            assert ready(obj)[:2] == ("True", "Converged"), ready(obj)
            assert [(pv.name, pv.vg_name) for pv in await lvm.pvs()] == [(disk, vg)]
            assert [
                (lv.name, lv.size_bytes, lv.active_on) for lv in obj.status.logical_volumes
            ] == [(LV, 8 * MIB, None)]
            again = await converge(store, reconciler)
            assert again.metadata.resource_version == obj.metadata.resource_version

            await activate_for_vm(store, settings, vg, LV, NODE)
            [report] = await lvm.lvs(vg)
            assert report.active is True
            obj = await converge(store, reconciler)
            assert [(lv.name, lv.active_on) for lv in obj.status.logical_volumes] == [(LV, NODE)]

            # Data written to the LV lands in the target's backing file, through iSCSI.
            marker = f"kvmctl {vg} through iSCSI".encode().ljust(4096, b"\0")
            await asyncio.to_thread(write_through, f"/dev/mapper/{vg}-{LV}", marker)
            assert marker in await asyncio.to_thread(backing_store.read_bytes)

            await deactivate(store, settings, vg, LV, NODE)
            assert not await asyncio.to_thread(os.path.exists, f"/dev/mapper/{vg}-{LV}")
            current = await store.get("VolumeGroup", "vg-cluster")
            assert isinstance(current, VolumeGroup)
            current.spec = volume_group(vg, {}).spec
            await store.update(current)
            obj = await converge(store, reconciler)
            assert ready(obj)[0] == "True" and obj.status.logical_volumes == []
            await lvm.vgremove(vg)
            assert [(pv.name, pv.vg_name) for pv in await lvm.pvs()] == [(disk, None)]
        finally:
            # Left over only if the test failed: the LV must not hold the disk at logout.
            await run("dmsetup", "remove", f"{vg}-{LV}")

    code, output = await run("iscsiadm", "-m", "session")
    assert code == ISCSI_ERR_NO_OBJS_FOUND, output
    await eventually(
        lambda: not os.path.exists(disk), f"{disk} gone after the logout", timeout=DEADLINE
    )
