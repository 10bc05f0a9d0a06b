"""VolumeGroup reconciler: PVs, the VG and its LVs on shared storage, and exclusive activation.

Every node that sees the storage (`spec.nodes`, or all) reconciles the object; one host at a time
changes LVM metadata, under an etcd lock bound to a lease (`metadata_lock`). Checks come first:
a device that is missing here, an iSCSI LUN not attached here, a device used by another VG, an
LV that would shrink or not fit: a condition and a Warning event, nothing changed.

Activation contract (called by the VirtualMachine reconciler of the node running the VM):
`activate_for_vm(store, settings, vg, lv, node)` claims the LV for `node` in etcd
(compare-and-swap, so two nodes can never both hold it), tags it `kvmctl_active_<node>` and
activates it exclusively; `deactivate(store, settings, vg, lv, node)` undoes that. See
docs/storage.md. Every LVM command goes through `reconcilers/drivers/lvm.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aetcd

from controller.runtime.events import EventRecorder
from controller.runtime.reconcile import Result, RetryableError
from controller.runtime.store import Store, StoreError
from crds import IscsiTarget, VirtualMachine, VolumeGroup
from crds.meta import ConditionStatus, parse_size
from crds.volumegroup import LogicalVolumeStatus, PhysicalVolume
from reconcilers.drivers.lvm import Lvm, LvmError, VgReport

log = logging.getLogger(__name__)

DEFAULT_RESYNC = 60.0
ACTIVE_TAG_PREFIX = "kvmctl_active_"


@dataclass(frozen=True)
class LvmSettings:
    """How this node runs LVM."""

    system_dir: str | None = None
    """LVM_SYSTEM_DIR (a private lvm.conf); None: /etc/lvm."""
    devices: tuple[str, ...] = ()
    """Restrict LVM to these devices (`--devices`); empty: every device lvm.conf allows."""
    lock_ttl: int = 30
    """Seconds a metadata lock outlives a host that died holding it."""
    lock_timeout: int = 60
    by_path_dir: str = "/dev/disk/by-path"
    """Where open-iscsi's udev rules name attached LUNs."""

    def driver(self) -> Lvm:
        """The LVM driver for this node's configuration and devices."""
        system_dir = Path(self.system_dir) if self.system_dir is not None else None
        return Lvm(system_dir=system_dir, devices=self.devices)


# -- the metadata lock and the activation contract ---------------------------------------------


class LockTimeout(RetryableError):
    """Another host held the VG's metadata lock for longer than the timeout."""


@contextlib.asynccontextmanager
async def metadata_lock(store: Store, vg: str, settings: LvmSettings) -> AsyncIterator[None]:
    """Hold `{prefix}/locks/lvm/{vg}` in etcd: one host at a time changes the VG's metadata.

    The lock's lease is refreshed while held, so only a host that dies holding it loses it
    (after `lock_ttl` seconds), never a slow one.
    """
    lock = store.client.lock(f"{store.prefix}/locks/lvm/{vg}".encode(), ttl=settings.lock_ttl)
    acquired = await store.call(
        lock.acquire(timeout=settings.lock_timeout), waits=settings.lock_timeout
    )
    if not acquired:
        raise LockTimeout(
            f"the metadata lock of VG {vg} stayed taken for {settings.lock_timeout} s"
        )
    keep_alive = asyncio.create_task(_refresh_forever(store, lock, settings.lock_ttl / 3))
    try:
        yield
    finally:
        keep_alive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keep_alive
        with contextlib.suppress(Exception):
            await store.call(lock.release())
            if lock.lease is not None:
                await store.call(lock.lease.revoke())


async def _refresh_forever(store: Store, lock: aetcd.Lock, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await store.call(lock.refresh())
        except StoreError as error:
            log.warning("refreshing the lease of %s failed: %s", lock.key.decode(), error)


class ActivationConflict(Exception):
    """The LV is active on (claimed by) another node."""


def _activation_key(store: Store, vg: str, lv: str) -> bytes:
    return f"{store.prefix}/lvm/activation/{vg}/{lv}".encode()


def active_tag(node: str) -> str:
    return f"{ACTIVE_TAG_PREFIX}{node.replace('-', '_')}"


async def active_on(store: Store, vg: str, lv: str) -> str | None:
    """The node holding the LV's activation claim, if any."""
    reply = await store.call(store.client.get(_activation_key(store, vg, lv)))
    return None if reply is None else str(reply.value.decode())


async def activate_for_vm(
    store: Store,
    settings: LvmSettings,
    vg: str,
    lv: str,
    node: str,
    take_over_from: str | None = None,
) -> None:
    """Claim `vg/lv` for `node` and activate it exclusively there, with LVM as `settings` says.

    The claim is a compare-and-swap in etcd: it succeeds when nobody holds it, when `node`
    already does, or when `take_over_from` does (only pass a node that has been fenced).
    Otherwise `ActivationConflict`. A failed activation drops the claim again.
    """
    key = _activation_key(store, vg, lv)
    client = store.client
    txn = client.transactions
    allowed = [txn.version(key) == 0, txn.value(key) == node.encode()]
    if take_over_from is not None:
        allowed.append(txn.value(key) == take_over_from.encode())
    claimed = False
    for compare in allowed:
        ok, _ = await store.call(
            client.transaction(compare=[compare], success=[txn.put(key, node.encode())], failure=[])
        )
        if ok:
            claimed = True
            break
    if not claimed:
        holder = await active_on(store, vg, lv)
        raise ActivationConflict(f"{vg}/{lv} is active on {holder}; deactivate it there first")
    lvm = settings.driver()
    try:
        async with metadata_lock(store, vg, settings):
            tags = {t for lv_ in await lvm.lvs(vg) if lv_.name == lv for t in lv_.tags}
            for tag in tags:
                if tag.startswith(ACTIVE_TAG_PREFIX) and tag != active_tag(node):
                    await lvm.del_tag(vg, lv, tag)
            if active_tag(node) not in tags:
                await lvm.add_tag(vg, lv, active_tag(node))
        await lvm.lvchange_activate(vg, lv, exclusive=True)
        if not any(found.name == lv and found.active is True for found in await lvm.lvs(vg)):
            # lvchange succeeds without activating when lvm.conf filters the LV out
            # (activation/volume_list) or activation is off (no device-mapper; `active` is None).
            raise LvmError(
                f"lvchange --activate ey {vg}/{lv}",
                f"it is not active on {node}: check activation/volume_list and that "
                "device-mapper is available",
            )
    except BaseException:
        await deactivate(store, settings, vg, lv, node)
        raise


async def deactivate(store: Store, settings: LvmSettings, vg: str, lv: str, node: str) -> None:
    """Deactivate `vg/lv` on `node` and drop its claim and tag (no-op when not held)."""
    lvm = settings.driver()
    with contextlib.suppress(LvmError):
        await lvm.lvchange_deactivate(vg, lv)
    async with metadata_lock(store, vg, settings):
        for found in await lvm.lvs(vg):
            if found.name == lv and active_tag(node) in found.tags:
                await lvm.del_tag(vg, lv, active_tag(node))
    key = _activation_key(store, vg, lv)
    txn = store.client.transactions
    await store.call(
        store.client.transaction(
            compare=[txn.value(key) == node.encode()], success=[txn.delete(key)], failure=[]
        )
    )


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
            await self._write_status(obj, problem)
            return Result(requeue_after=self.resync)
        except LvmError as error:
            await self._write_status(obj, VgProblem("LvmFailed", str(error)))
            raise RetryableError(str(error)) from None
        if actions:
            await self.recorder.record(obj, "Normal", "Configured", "; ".join(actions))
        await self._write_status(obj, None)
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

    async def _write_status(self, obj: VolumeGroup, problem: VgProblem | None) -> None:
        vg_name = obj.spec.vg_name
        report = await self._vg_report(vg_name)
        lvs = await self.lvm.lvs(vg_name) if report is not None else []
        holders = {lv.name: await active_on(self.store, vg_name, lv.name) for lv in lvs}
        status_lvs = [
            LogicalVolumeStatus(name=lv.name, size_bytes=lv.size_bytes, active_on=holders[lv.name])
            for lv in lvs
        ]
        ready: tuple[ConditionStatus, str, str] = (
            ("False", problem.reason, f"{self.node}: {problem.message}")
            if problem is not None
            else ("True", "Converged", f"VG {vg_name} matches the spec")
        )
        generation = obj.metadata.generation
        newly_failed = False

        def mutate(current: VolumeGroup) -> bool:
            nonlocal newly_failed
            status = current.status
            before = status.model_dump()
            old = status.condition("Ready")
            status.size_bytes = report.size_bytes if report is not None else None
            status.free_bytes = report.free_bytes if report is not None else None
            status.logical_volumes = status_lvs
            status.set_condition("Ready", *ready, observed_generation=generation)
            newly_failed = ready[0] == "False" and (
                old is None or (old.status, old.reason) != ready[:2]
            )
            return status.model_dump() != before

        updated = await self.store.patch_status("VolumeGroup", obj.metadata.name, mutate)
        if newly_failed:
            await self.recorder.record(updated, "Warning", ready[1], ready[2])
