"""Storage-path loss under Debian's kernel: a real open-iscsi session to a real tgtd, dropped.

A VG on an iSCSI LUN (tgtd, iscsid and iscsiadm as in test_iscsi_pv_lab.py); the agent's
`StorageWatch` (controller/ha/storage_watch.py) checks the path `vg NAME` a VM with an LV of
that VG needs: healthy while the session is LOGGED_IN and LVM sees the PV; lost when tgtd is
killed (the kernel marks the session FAILED and iscsid keeps trying to recover it); healthy
again once tgtd serves the target again and iscsid logged back in. Everything started is
stopped by its PID, the VG removed and the session logged out.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from controller.ha.storage_watch import StorageSources, StorageWatch
from controller.runtime.store import Store
from crds import IscsiTarget, ObjectMeta, VirtualMachine, VolumeGroup
from crds.virtualmachine import VirtualMachineSpec
from crds.volumegroup import VolumeGroupSpec
from e2e.harness.iscsi_lab import (
    DEADLINE,
    IQN,
    LUN,
    NODE,
    logged_in,
    lvm_settings,
    serve_target,
)
from e2e.harness.polling import eventually
from reconcilers.drivers.storage_paths import LOGGED_IN, iscsi_sessions
from reconcilers.tgtd_supervisor import TgtdSupervisor, remove_stale_control_socket
from reconcilers.volumegroup import iscsi_by_path


def session_state() -> str | None:
    return next((s.state for s in iscsi_sessions() if s.target == IQN), None)


async def kill_tgtd(supervisor: TgtdSupervisor) -> None:
    """The target's host dies: tgtd killed by its PID, no logout, no target deleted."""
    process, supervisor.process = supervisor.process, None
    assert process is not None
    process.kill()
    await process.wait()
    await asyncio.to_thread(remove_stale_control_socket, supervisor.control_port)


async def test_a_dropped_iscsi_session_is_reported_lost_then_back(
    tmp_path: Path,
    backing_store: Path,
    store: Store,
    tgtd: TgtdSupervisor,
    iscsid: asyncio.subprocess.Process,
    iscsid_log: BinaryIO,
) -> None:
    targets = await serve_target(store, tgtd, backing_store)
    target = await store.get("IscsiTarget", "vg-cluster")
    assert isinstance(target, IscsiTarget)
    vg = f"vg_lab_{uuid.uuid4().hex[:6]}"
    group = VolumeGroup(
        metadata=ObjectMeta(name="vg-cluster"),
        spec=VolumeGroupSpec.model_validate(
            {
                "vgName": vg,
                "nodes": [NODE],
                "physicalVolumes": [{"iscsi": {"target": "vg-cluster", "lun": LUN}}],
            }
        ),
    )
    vm = VirtualMachine(
        metadata=ObjectMeta(name="vm1"),
        spec=VirtualMachineSpec.model_validate(
            {"memoryMiB": 64, "disks": [{"volume": f"{vg}/lv_vm1"}]}
        ),
    )
    async with logged_in(IQN, tgtd.portal) as disk:
        by_path_dir = tmp_path / "by-path"
        by_path_dir.mkdir()
        link = iscsi_by_path(str(by_path_dir), tgtd.portal, IQN, LUN)
        await asyncio.to_thread(os.symlink, disk, link)
        lvm = lvm_settings(tmp_path, link).driver()
        await lvm.pvcreate(link)
        await lvm.vgcreate(vg, [link])
        try:
            sources = StorageSources(
                vms=lambda: [vm],
                volume_groups=lambda: [group],
                iscsi_target=lambda name: target if name == "vg-cluster" else None,
                node=lambda _name: None,
            )
            watch = StorageWatch(NODE, sources, lvm, timeout=DEADLINE)
            assert session_state() == LOGGED_IN
            assert await watch.lost() == {}

            await kill_tgtd(tgtd)
            await eventually(
                lambda: asyncio.to_thread(lambda: session_state() not in (LOGGED_IN, None)),
                "the kernel marks the session failed",
                timeout=DEADLINE,
            )
            lost = await watch.lost()
            assert list(lost) == [f"vg {vg}"], lost
            assert lost[f"vg {vg}"].startswith(f"iSCSI session to {IQN} (LUN {LUN} of "), lost

            assert await tgtd.ensure_running()
            await targets.reconcile("vg-cluster")  # the new tgtd serves the target again
            try:
                await eventually(
                    lambda: asyncio.to_thread(lambda: session_state() == LOGGED_IN),
                    "iscsid logged back in",
                    timeout=2 * DEADLINE,
                )
            except AssertionError as error:
                log = await asyncio.to_thread(Path(iscsid_log.name).read_text, errors="replace")
                raise AssertionError(f"{error}; iscsid's log:\n{log[-4000:]}") from None
            assert await watch.lost() == {}
        finally:
            await lvm.vgremove(vg)
