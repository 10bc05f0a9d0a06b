"""The LVM activation-claim protocol, whole: who may have a shared LV active, and hand-overs.

An LV on shared storage may be active on one node at a time: the claim on one LV is
`reconcilers/lv_claim.py`. The steps of the protocol, all here (`VolumeClaims`):

- before a domain starts: claim and activate each LV of the VM, taking over from a holder whose
  node is `Fenced` (any other holder refuses); if one cannot be, the ones just taken are
  released and the VM is blocked (`activate_for_start`);
- while a domain runs: claim again a claim that is free (`keep`);
- once a domain is stopped, crashed for good, destroyed or removed: deactivate and release the
  LVs this node holds, unless another VM placed here uses one (`release`);
- live migration, target: take the LVs over from the source and report `VolumesActivated` on
  the migration (`take_over_incoming`); after a failure deactivate them again
  (`release_failed_incoming`);
- live migration, source: wait for the target's `VolumesActivated` (`wait_for_target`); after a
  success deactivate here (`deactivate_after_migration`), after a failure take the claims back
  from the target (`take_back`).
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from typing import Any

from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer
from controller.runtime.reconcile import RetryableError
from controller.runtime.store import NotFound, Store, StoreError
from crds import ClusterNode, VirtualMachine, VirtualMachineMigration
from crds.meta import ConditionStatus
from crds.migration import VOLUMES_ACTIVATED
from reconcilers.lv_claim import ACTIVATION_ERRORS, activate_for_vm, active_on, deactivate
from reconcilers.lvm_lock import LvmSettings

log = logging.getLogger(__name__)

Volume = tuple[str, str]
"""An LV as (vg, lv)."""


def vm_volumes(vm: VirtualMachine) -> list[Volume]:
    """The LV of each `volume: VG/LV` disk of the VM, in disk order, without repeats."""
    volumes: list[Volume] = []
    for disk in vm.spec.disks:
        ref = disk.volume_ref()
        if ref is not None and (ref.vg, ref.lv) not in volumes:
            volumes.append((ref.vg, ref.lv))
    return volumes


def names(volumes: Iterable[Volume]) -> str:
    return ", ".join(f"{vg}/{lv}" for vg, lv in volumes)


def block_volumes(domain_xml: str) -> list[Volume]:
    """The LVs (`/dev/VG/LV` block sources) a domain's disks open."""
    volumes: list[Volume] = []
    for source in ET.fromstring(domain_xml).iterfind("devices/disk[@type='block']/source"):
        parts = PurePosixPath(source.get("dev", "")).parts
        if len(parts) == 4 and parts[:2] == ("/", "dev") and (parts[2], parts[3]) not in volumes:
            volumes.append((parts[2], parts[3]))
    return volumes


# -- the protocol's steps, for one node --------------------------------------------------------


class VolumeClaims:
    """The claim steps of node `node`; with `lvm` None this node does not manage activation and
    every step is a no-op (hosts without device-mapper, or where something else activates)."""

    def __init__(
        self,
        store: Store,
        node: str,
        lvm: LvmSettings | None,
        vms: Informer,
        migrations: Informer,
        nodes: Informer,
        recorder: EventRecorder,
    ) -> None:
        self.store = store
        self.node = node
        self.lvm = lvm
        self.vms = vms
        self.migrations = migrations
        self.nodes = nodes
        self.recorder = recorder

    def volumes(self, vm: VirtualMachine | None, domain_xml: str | None) -> list[Volume]:
        """The LVs to release when the VM leaves: its own and those its domain here opens."""
        if self.lvm is None:
            return []
        volumes = vm_volumes(vm) if vm is not None else []
        if domain_xml is not None:
            volumes += [v for v in block_volumes(domain_xml) if v not in volumes]
        return volumes

    # -- a domain starting, running, leaving ---------------------------------------------------

    async def activate_for_start(self, vm: VirtualMachine) -> str | None:
        """Claim and activate the VM's LVs here: None, or why one cannot be.

        The LVs this attempt activated are released again, so a VM that cannot start holds none.
        """
        lvm = self.lvm
        if lvm is None:
            return None
        activated: list[Volume] = []
        try:
            for vg, lv in vm_volumes(vm):
                holder = await self._fenced_holder(vg, lv)
                await activate_for_vm(self.store, lvm, vg, lv, self.node, take_over_from=holder)
                activated.append((vg, lv))
        except ACTIVATION_ERRORS as error:
            await self.release(activated, vm.metadata.name)
            return f"not started on {self.node}: {error}"
        return None

    async def _fenced_holder(self, vg: str, lv: str) -> str | None:
        """The node holding the LV's claim when that node is Fenced (its claim may be taken)."""
        holder = await active_on(self.store, vg, lv)
        if holder is None or holder == self.node:
            return None
        node = self.nodes.get(holder)
        fenced = isinstance(node, ClusterNode) and node.status.health == "Fenced"
        return holder if fenced else None

    async def keep(self, vm: VirtualMachine) -> None:
        """A domain runs here: claim its LVs again where their claim is free (none is lost)."""
        lvm = self.lvm
        if lvm is None:
            return
        name = vm.metadata.name
        for vg, lv in vm_volumes(vm):
            holder = await active_on(self.store, vg, lv)
            if holder == self.node:
                continue
            if holder is not None:
                log.warning(
                    "%s/%s of %s running on %s is claimed by %s", vg, lv, name, self.node, holder
                )
                continue
            try:
                await activate_for_vm(self.store, lvm, vg, lv, self.node)
            except ACTIVATION_ERRORS as error:
                log.warning("claiming %s/%s of running %s again: %s", vg, lv, name, error)

    async def release(self, volumes: list[Volume], vm_name: str) -> None:
        """Deactivate and release the `volumes` this node holds, unless another VM here uses one."""
        lvm = self.lvm
        if lvm is None or not volumes:
            return
        in_use = {
            volume
            for other in self.vms.list()
            if isinstance(other, VirtualMachine)
            and other.metadata.name != vm_name
            and other.status.placement is not None
            and other.status.placement.node == self.node
            for volume in vm_volumes(other)
        }
        for vg, lv in volumes:
            if (vg, lv) in in_use or await active_on(self.store, vg, lv) != self.node:
                continue
            try:
                await deactivate(self.store, lvm, vg, lv, self.node)
            except ACTIVATION_ERRORS as error:
                raise RetryableError(f"releasing {vg}/{lv} on {self.node}: {error}") from None
            log.info("released %s/%s of %s on %s", vg, lv, vm_name, self.node)

    # -- live migration, target side -----------------------------------------------------------

    async def take_over_incoming(
        self, vm: VirtualMachine, migration: VirtualMachineMigration
    ) -> None:
        """Target of a Running migration: take the VM's LVs over from the source.

        `VolumesActivated` is set to Unknown before anything is done, so a failed migration's
        LVs are deactivated again whatever point this reached (`release_failed_incoming`).
        """
        lvm = self.lvm
        volumes = vm_volumes(vm)
        if (
            lvm is None
            or not volumes
            or migration.spec.target_node != self.node
            or migration.status.phase != "Running"
            or migration.status.condition(VOLUMES_ACTIVATED) is not None
        ):
            return
        begun = await self._set_volumes_activated(
            migration,
            ("Unknown", "Activating", f"activating {names(volumes)} on {self.node}"),
            when=lambda m: (
                m.status.phase == "Running" and m.status.condition(VOLUMES_ACTIVATED) is None
            ),
        )
        if not begun:
            return
        source = migration.status.source_node
        try:
            for vg, lv in volumes:
                await activate_for_vm(self.store, lvm, vg, lv, self.node, take_over_from=source)
        except ACTIVATION_ERRORS as error:
            message = f"{self.node} could not activate {names(volumes)}: {error}"
            await self._set_volumes_activated(
                migration, ("False", "VolumeActivationFailed", message), when=_activating
            )
            await self.recorder.record(
                migration, "Warning", "VolumeActivationFailed", "%s", message
            )
            return
        await self._set_volumes_activated(
            migration,
            ("True", "Activated", f"{names(volumes)} active on {self.node}"),
            when=_activating,
        )

    async def release_failed_incoming(self, vm: VirtualMachine) -> None:
        """Deactivate here the LVs taken over for an incoming migration that failed."""
        lvm = self.lvm
        if lvm is None:
            return
        for migration in self.migrations.list():
            if not (
                isinstance(migration, VirtualMachineMigration)
                and migration.spec.vm == vm.metadata.name
                and migration.spec.target_node == self.node
                and migration.status.phase == "Failed"
            ):
                continue
            condition = migration.status.condition(VOLUMES_ACTIVATED)
            if condition is None or condition.reason == "Released":
                continue
            for vg, lv in vm_volumes(vm):
                try:
                    await deactivate(self.store, lvm, vg, lv, self.node)
                except ACTIVATION_ERRORS as error:
                    raise RetryableError(f"releasing {vg}/{lv} on {self.node}: {error}") from None
            message = f"deactivated on {self.node}: the migration failed"
            await self._set_volumes_activated(
                migration, ("False", "Released", message), when=_not_released
            )

    async def _set_volumes_activated(
        self,
        migration: VirtualMachineMigration,
        condition: tuple[ConditionStatus, str, str],
        when: Callable[[VirtualMachineMigration], bool],
    ) -> bool:
        """Set the migration's `VolumesActivated` if `when(current)`; True if it was written."""
        written = False

        def mutate(current: Any) -> bool:
            nonlocal written
            if not isinstance(current, VirtualMachineMigration) or not when(current):
                return False
            written = current.status.set_condition(VOLUMES_ACTIVATED, *condition)
            return written

        try:
            await self.store.patch_status(
                "VirtualMachineMigration", migration.metadata.name, mutate
            )
        except NotFound:
            return False
        return written

    # -- live migration, source side -----------------------------------------------------------

    async def wait_for_target(
        self, migration: VirtualMachineMigration, timeout: float, poll: float
    ) -> str | None:
        """Wait until the target's agent holds the VM's LVs: None, or why it does not."""
        vm = self.vms.get(migration.spec.vm)
        volumes = vm_volumes(vm) if self.lvm is not None and isinstance(vm, VirtualMachine) else []
        if not volumes:
            return None
        name, target = migration.metadata.name, migration.spec.target_node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            current = self.migrations.get(name)
            if not isinstance(current, VirtualMachineMigration):
                return "the migration was deleted"
            condition = current.status.condition(VOLUMES_ACTIVATED)
            if condition is not None and condition.status != "Unknown":  # Unknown: activating
                return None if condition.status == "True" else condition.message
            await asyncio.sleep(poll)
        return (
            f"{target} did not activate {names(volumes)} within {timeout:.0f} s "
            "(does its agent manage LV activation?)"
        )

    async def deactivate_after_migration(self, vm: VirtualMachine) -> None:
        """After a success: the target holds the claims; deactivate the source's copy."""
        if self.lvm is None:
            return
        for vg, lv in vm_volumes(vm):
            try:
                await deactivate(self.store, self.lvm, vg, lv, self.node)
            except (*ACTIVATION_ERRORS, StoreError) as error:
                message = f"{vg}/{lv} stays active on {self.node} after the migration: {error}"
                await self.recorder.record(vm, "Warning", "VolumeDeactivationFailed", message)

    async def take_back(self, migration: VirtualMachineMigration) -> None:
        """After a failure: the VM still runs here; take its LVs' claims back from the target."""
        vm = self.vms.get(migration.spec.vm)
        if self.lvm is None or not isinstance(vm, VirtualMachine):
            return
        target = migration.spec.target_node
        for vg, lv in vm_volumes(vm):
            try:
                await activate_for_vm(
                    self.store, self.lvm, vg, lv, self.node, take_over_from=target
                )
            except (*ACTIVATION_ERRORS, StoreError) as error:
                message = f"{vg}/{lv} not claimed back for {self.node} after the failed migration"
                await self.recorder.record(
                    vm, "Warning", "VolumeActivationFailed", f"{message}: {error}"
                )


def _activating(migration: VirtualMachineMigration) -> bool:
    condition = migration.status.condition(VOLUMES_ACTIVATED)
    return condition is not None and condition.reason == "Activating"


def _not_released(migration: VirtualMachineMigration) -> bool:
    condition = migration.status.condition(VOLUMES_ACTIVATED)
    return condition is not None and condition.reason != "Released"
