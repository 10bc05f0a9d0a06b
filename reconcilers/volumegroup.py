"""VolumeGroup reconciler: PVs, the VG and its LVs on shared storage, and exclusive activation.

Every node that sees the storage (`spec.nodes`, or all) reconciles the object; one host at a time
changes LVM metadata, under an etcd lock bound to a lease (`metadata_lock`). Checks come first:
a device that is missing here, an iSCSI LUN not attached here, a device used by another VG, an
LV that would shrink or not fit: a condition and a Warning event, nothing changed.

The activation of LVs for VMs (who may have an LV active) is `reconcilers/volume_claims.py`;
this reconciler reports each LV's holder. Every LVM command goes through
`reconcilers/drivers/lvm.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from controller.runtime.events import EventRecorder
from controller.runtime.reconcile import Blocked, Result
from controller.runtime.store import Store
from crds import IscsiTarget, VirtualMachine, VolumeGroup
from crds.meta import parse_size
from crds.volumegroup import LogicalVolumeStatus, PhysicalVolume
from reconcilers.drivers.lvm import LvmError, VgReport
from reconcilers.lv_claim import active_on
from reconcilers.lvm_lock import LvmSettings, metadata_lock

log = logging.getLogger(__name__)

DEFAULT_RESYNC = 60.0


# -- the reconciler ----------------------------------------------------------------------------


class VgProblem(Exception):
    """The VG cannot converge now; nothing was changed. `reason` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _round_up(size: int, extent: int) -> int:
    return -(-size // extent) * extent


def _real_paths(paths: list[str]) -> list[str]:
    return [os.path.realpath(path) for path in paths]


def iscsi_by_path(directory: str, portal: str, iqn: str, lun: int) -> str:
    """The udev name open-iscsi's LUN gets: `ip-PORTAL-iscsi-IQN-lun-N`."""
    host = "0.0.0.0" if portal.startswith("0.0.0.0") else portal.rsplit(":", 1)[0]
    port = portal.rsplit(":", 1)[1]
    return f"{directory}/ip-{host}:{port}-iscsi-{iqn}-lun-{lun}"


class VolumeGroupReconciler:
    """Reconciles VolumeGroups that `node` sees, with LVM as `settings` says."""

    def __init__(
        self,
        store: Store,
        node: str,
        recorder: EventRecorder,
        settings: LvmSettings,
        resync: float = DEFAULT_RESYNC,
    ) -> None:
        self.store = store
        self.node = node
        self.recorder = recorder
        self.settings = settings
        self.lvm = settings.driver()
        self.resync = resync

    async def reconcile(self, key: str) -> Result:
        obj = await self.store.try_get("VolumeGroup", key)
        if not isinstance(obj, VolumeGroup) or obj.metadata.deletion_timestamp is not None:
            return Result()
        if obj.spec.nodes and self.node not in obj.spec.nodes:
            return Result()
        actions: list[str] = []
        try:
            devices = await self._devices(obj.spec.physical_volumes)
            async with metadata_lock(self.store, obj.spec.vg_name, self.settings):
                await self._converge_vg(obj, devices, actions)
                await self._converge_lvs(obj, actions)
        except VgProblem as problem:
            if actions:
                await self.recorder.record(obj, "Normal", "Configured", "; ".join(actions))
            await self._write_status(obj, ready=False)
            raise Blocked(problem.reason, f"{self.node}: {problem.message}", self.resync) from None
        except LvmError as error:
            await self._write_status(obj, ready=False)
            raise Blocked("LvmFailed", f"{self.node}: {error}") from None
        if actions:
            await self.recorder.record(obj, "Normal", "Configured", "; ".join(actions))
        await self._write_status(obj, ready=True)
        return Result(requeue_after=self.resync)

    async def _devices(self, pvs: list[PhysicalVolume]) -> list[str]:
        """Each PV's device path on this node; `VgProblem` if one is not here."""
        devices = []
        for pv in pvs:
            if pv.device is not None:
                path = pv.device
            else:
                assert pv.iscsi is not None
                target = await self.store.try_get("IscsiTarget", pv.iscsi.target)
                if not isinstance(target, IscsiTarget):
                    raise VgProblem(
                        "IscsiTargetMissing", f"IscsiTarget {pv.iscsi.target!r} does not exist"
                    )
                path = iscsi_by_path(
                    self.settings.by_path_dir,
                    target.spec.portal,
                    target.spec.iqn,
                    pv.iscsi.lun,
                )
                if not await asyncio.to_thread(os.path.exists, path):
                    raise VgProblem(
                        "IscsiNotAttached",
                        f"LUN {pv.iscsi.lun} of {target.spec.iqn} is not attached to "
                        f"{self.node} (no {path}); log in with open-iscsi first",
                    )
            if not await asyncio.to_thread(os.path.exists, path):
                raise VgProblem("DeviceMissing", f"device {path} does not exist on {self.node}")
            devices.append(path)
        return devices

    async def _converge_vg(self, obj: VolumeGroup, devices: list[str], actions: list[str]) -> None:
        vg = obj.spec.vg_name
        # Each PV's device -> its VG (None: in no VG); a device that is not a PV is absent.
        # Keyed by real path: LVM reports /dev/sdb for a PV given as a by-path link.
        pvs = await self.lvm.pvs()
        pv_paths = await asyncio.to_thread(_real_paths, [pv.name for pv in pvs])
        owners = {path: pv.vg_name for path, pv in zip(pv_paths, pvs, strict=True)}
        real = dict(zip(devices, await asyncio.to_thread(_real_paths, devices), strict=True))
        foreign = [d for d in devices if owners.get(real[d]) not in (None, vg)]
        if foreign:
            raise VgProblem(
                "DeviceInUse",
                ", ".join(f"{d} belongs to VG {owners[real[d]]}" for d in foreign),
            )
        for device in devices:
            if real[device] not in owners:
                await self.lvm.pvcreate(device)
                actions.append(f"created PV {device}")
        if await self._vg_report(vg) is None:
            await self.lvm.vgcreate(vg, devices)
            actions.append(f"created VG {vg} on {', '.join(devices)}")
            return
        joining = [d for d in devices if owners.get(real[d]) != vg]
        if joining:
            await self.lvm.vgextend(vg, joining)
            actions.append(f"extended VG {vg} with {', '.join(joining)}")

    async def _vg_report(self, vg: str) -> VgReport | None:
        return next((report for report in await self.lvm.vgs() if report.name == vg), None)

    async def _converge_lvs(self, obj: VolumeGroup, actions: list[str]) -> None:
        vg_name = obj.spec.vg_name
        report = await self._vg_report(vg_name)
        assert report is not None
        present = {lv.name: lv for lv in await self.lvm.lvs(vg_name)}
        wanted = {
            lv.name: _round_up(parse_size(lv.size), report.extent_size_bytes)
            for lv in obj.spec.logical_volumes
        }
        shrinking = [
            f"{name} ({present[name].size_bytes} -> {size} bytes)"
            for name, size in wanted.items()
            if name in present and size < present[name].size_bytes
        ]
        needed = sum(
            size - (present[name].size_bytes if name in present else 0)
            for name, size in wanted.items()
            if name not in present or size > present[name].size_bytes
        )
        if needed > report.free_bytes:
            raise VgProblem(
                "InsufficientSpace",
                f"VG {vg_name} has {report.free_bytes} bytes free; the spec needs {needed} more",
            )
        for name, size in wanted.items():
            if name not in present:
                await self.lvm.lvcreate(vg_name, name, size)
                actions.append(f"created LV {vg_name}/{name} ({size} bytes)")
            elif size > present[name].size_bytes:
                await self.lvm.lvextend(vg_name, name, size)
                actions.append(f"extended LV {vg_name}/{name} to {size} bytes")
        in_use = await self._lvs_used_by_vms(vg_name)
        kept = []
        for name in present:
            if name in wanted:
                continue
            if name in in_use:
                kept.append(f"{vg_name}/{name} (used by {', '.join(in_use[name])})")
                continue
            await self.lvm.lvremove(vg_name, name)
            actions.append(f"removed LV {vg_name}/{name}")
        if shrinking:
            raise VgProblem(
                "ShrinkRefused",
                f"shrinking is refused (data would be lost): {', '.join(shrinking)}",
            )
        if kept:
            raise VgProblem(
                "LogicalVolumeInUse", f"not removed while VMs use them: {', '.join(kept)}"
            )

    async def _lvs_used_by_vms(self, vg: str) -> dict[str, list[str]]:
        objects, _ = await self.store.list_objects("VirtualMachine")
        used: dict[str, list[str]] = {}
        for vm in objects:
            if not isinstance(vm, VirtualMachine):
                continue
            for disk in vm.spec.disks:
                ref = disk.volume_ref()
                if ref is not None and ref.vg == vg:
                    used.setdefault(ref.lv, []).append(vm.metadata.name)
        return used

    async def _write_status(self, obj: VolumeGroup, ready: bool) -> None:
        """Report the VG's size and LVs with their holders; `Ready=True` if `ready` (a problem
        is recorded from the `Blocked` the reconcile raises)."""
        vg_name = obj.spec.vg_name
        report = await self._vg_report(vg_name)
        lvs = await self.lvm.lvs(vg_name) if report is not None else []
        holders = {lv.name: await active_on(self.store, vg_name, lv.name) for lv in lvs}
        status_lvs = [
            LogicalVolumeStatus(name=lv.name, size_bytes=lv.size_bytes, active_on=holders[lv.name])
            for lv in lvs
        ]
        generation = obj.metadata.generation

        def mutate(current: VolumeGroup) -> bool:
            status = current.status
            before = status.model_dump()
            status.size_bytes = report.size_bytes if report is not None else None
            status.free_bytes = report.free_bytes if report is not None else None
            status.logical_volumes = status_lvs
            if ready:
                message = f"VG {vg_name} matches the spec"
                status.set_condition("Ready", "True", "Converged", message, generation)
            return status.model_dump() != before

        await self.store.patch_status("VolumeGroup", obj.metadata.name, mutate)
