"""The VirtualMachine reconciler of one host agent: libvirt domains follow `status.placement`.

Level-triggered: `reconcile(name)` reads the VM (informer cache), the local domain of the same
name (libvirt) and converges one step:

- placed here, `runState: started`: add the finalizer `kvmctl.io/domain`, define the domain from
  the spec and start it (after re-reading the VM from etcd: a stale cache never starts a VM
  that was moved away); a running domain is adopted (its owner uid matches). A spec changed
  while running sets `RestartRequired` and is applied at the next start. A domain that stops
  while it should run is restarted in place, up to `restartPolicy.maxRestarts` within
  `windowSeconds`; past that: `RestartLimitReached`, state Crashed, left down.
- placed here, `stopped`/`disabled`: graceful shutdown within `shutdownTimeoutSeconds`, then
  destroy.
- not placed here: a running domain is destroyed at once with a Warning event
  `DomainStoppedNotPlacedHere` (never two copies), except while a migration of the VM to or
  from this node is in flight (`reconcilers.migration.in_flight_migration`).
- being deleted: destroy and undefine the local domain; the placement node (or any node when
  there is no placement) then removes the finalizer.

LV activation (when `DomainSettings.lvm` is set; docs/storage.md): before a domain with
`volume: VG/LV` disks is defined and started, each LV is claimed and activated here
(`activate_for_vm`, taking over from a holder whose node is `Fenced`); if one cannot be, the
domain is not started: `Ready=False` `VolumeActivationFailed`, a Warning event, a new attempt
every `ACTIVATION_RETRY`. Once the domain is stopped, crashed for good, destroyed or removed,
the LVs this node holds are deactivated and released. A running domain re-claims a free claim.
As the target of a Running migration the agent takes the LVs over from the source and reports
`VolumesActivated` on the migration; if the migration fails it deactivates them again.

Domains without kvmctl owner metadata are never touched. The domain's metadata carries the VM's
name, uid, generation, node and `specHash` (a hash of the definition without the metadata), so
a spec change is noticed whatever field changed and only when it changes the domain.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import string
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from ipaddress import ip_address
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer
from controller.runtime.layout import NODE_FINALIZERS
from controller.runtime.leader import CONTROLLER_ELECTION, leader_key
from controller.runtime.reconcile import Result, RetryableError, TerminalError
from controller.runtime.store import NotFound, Store, StoreError
from crds import ClusterNode, IscsiTarget, VirtualMachine, VirtualMachineMigration
from crds.event import ObjectReference
from crds.meta import ConditionStatus, now
from crds.migration import VOLUMES_ACTIVATED
from crds.virtualmachine import Disk
from reconcilers.drivers.domain_xml import (
    BlockSource,
    DiskSource,
    DiskSpec,
    DomainSpec,
    DomainSpecError,
    DomainType,
    FileSource,
    IscsiSource,
    NicSpec,
    build_domain_xml,
    parse_kvmctl_metadata,
)
from reconcilers.drivers.libvirt import (
    DomainInfo,
    DomainNotFound,
    DomainState,
    DomainStateConflict,
    InvalidDefinition,
    LibvirtError,
    LibvirtHost,
    LibvirtUnavailable,
)
from reconcilers.migration import (
    ACTIVATION_ERRORS,
    Volume,
    in_flight_migration,
    names,
    vm_volumes,
)
from reconcilers.volumegroup import LvmSettings, activate_for_vm, active_on, deactivate

log = logging.getLogger(__name__)

FINALIZER = NODE_FINALIZERS["VirtualMachine"]
TCG_TB_CACHE_MIB = 16
"""TCG's translation cache for `qemu` domains: QEMU's default (1 GiB) would dominate RSS."""
BLOCKED_RETRY = 1.0
"""Seconds between looks while starting a domain is not allowed (no heartbeat lease)."""
ACTIVATION_RETRY = 5.0
"""Seconds between attempts to activate the LVs of a VM that cannot start yet."""
ACTIVE_STATES = frozenset(
    {
        DomainState.RUNNING,
        DomainState.BLOCKED,
        DomainState.PAUSED,
        DomainState.SHUTTING_DOWN,
        DomainState.PMSUSPENDED,
        DomainState.NOSTATE,
    }
)
"""States in which a guest exists (a qemu process runs)."""


@dataclass(frozen=True)
class DomainSettings:
    """How this host builds domains."""

    domain_type: DomainType = "kvm"
    serial_log_dir: Path | None = None
    """Each VM's serial console is appended to `<dir>/<vm>.log`; None gives a pty."""
    lvm: LvmSettings | None = None
    """Manage the activation of `volume:` disks with this node's LVM settings; None: do not
    (hosts without device-mapper, or where something else activates the LVs)."""


def spec_hash(spec: DomainSpec) -> str:
    """A short hash of everything in the definition except the owner metadata."""
    xml = build_domain_xml(replace(spec, metadata={}))
    return hashlib.sha256(xml.encode()).hexdigest()[:16]


def _auto_targets(disks: list[Disk]) -> list[str]:
    """Each disk's guest device: its own `target`, else the first free `vdX`."""
    taken = {disk.target for disk in disks if disk.target is not None}
    free = (f"vd{letter}" for letter in string.ascii_lowercase if f"vd{letter}" not in taken)
    return [disk.target if disk.target is not None else next(free) for disk in disks]


def _split_portal(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


class VirtualMachineReconciler:
    """Reconciles VirtualMachines on node `node`; see the module docstring.

    `host` is the current libvirt connection (the agent replaces it after a reconnect; None
    while disconnected). `start_blocker()` returns why starting domains is not allowed now
    (for example: no valid heartbeat lease), or None.
    """

    def __init__(
        self,
        node: str,
        store: Store,
        vms: Informer,
        migrations: Informer,
        iscsi_targets: Informer,
        nodes: Informer,
        recorder: EventRecorder,
        settings: DomainSettings,
        start_blocker: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.node = node
        self.store = store
        self.vms = vms
        self.migrations = migrations
        self.iscsi_targets = iscsi_targets
        self.nodes = nodes
        self.recorder = recorder
        self.settings = settings
        self.start_blocker = start_blocker
        self.host: LibvirtHost | None = None

    async def reconcile(self, key: str) -> Result:
        host = self.host
        if host is None:
            raise RetryableError(f"no libvirt connection on {self.node}")
        try:
            return await self._reconcile(host, key)
        except LibvirtUnavailable as error:
            raise RetryableError(str(error)) from None

    async def _reconcile(self, host: LibvirtHost, name: str) -> Result:
        obj = self.vms.get(name)
        vm = obj if isinstance(obj, VirtualMachine) else None
        domain = await host.lookup(name)
        if domain is not None and not domain.metadata.get("uid"):
            if vm is not None and self._placed_here(vm) and vm.spec.run_state == "started":
                raise TerminalError(
                    "DomainNameTaken",
                    f"host {self.node} has a domain {name!r} not created by kvmctl; "
                    "rename or remove it",
                )
            return Result()  # a foreign domain: never touched
        if domain is not None and (vm is None or domain.metadata["uid"] != vm.metadata.uid):
            await self._remove_stale(host, domain, vm)
            domain = None
        if vm is None:
            return Result()
        if vm.metadata.deletion_timestamp is not None:
            return await self._delete(host, vm, domain)
        migration = in_flight_migration(self.migrations.list(), name, self.node)
        if migration is not None:
            return await self._leave_to_migration(vm, migration)
        if not self._placed_here(vm):
            if domain is not None and not await self._confirmed_elsewhere(vm):
                return Result()  # the caches were behind; the informers bring the change
            volumes = await self._volumes(host, vm, domain)
            if domain is not None:
                await self._remove_not_placed(host, vm, domain)
            await self._release(volumes, name)
            await self._release_failed_incoming(vm)
            return Result()
        if FINALIZER not in vm.metadata.finalizers:
            await self.store.add_finalizer("VirtualMachine", name, FINALIZER)
        if vm.spec.run_state != "started":
            return await self._stop(host, vm, domain)
        return await self._run(host, vm, domain)

    def _placed_here(self, vm: VirtualMachine) -> bool:
        placement = vm.status.placement
        return placement is not None and placement.node == self.node

    # -- desired domain ----------------------------------------------------------------------

    def domain_spec(self, vm: VirtualMachine) -> DomainSpec:
        """The domain definition for `vm` on this node; TerminalError for a bad reference."""
        name = vm.metadata.name
        if vm.metadata.uid is None:
            raise RetryableError(f"VirtualMachine {name!r} has no uid yet")
        disks = tuple(
            DiskSpec(self._disk_source(vm, disk, index), target, readonly=disk.readonly)
            for index, (disk, target) in enumerate(
                zip(vm.spec.disks, _auto_targets(vm.spec.disks), strict=True)
            )
        )
        nics = tuple(NicSpec(nic.bridge, nic.mac, nic.model) for nic in vm.spec.nics)
        boot = vm.spec.boot
        serial_dir = self.settings.serial_log_dir
        spec = DomainSpec(
            name=name,
            uuid=vm.metadata.uid,
            domain_type=self.settings.domain_type,
            vcpus=vm.spec.vcpus,
            memory_mib=vm.spec.memory_mib,
            disks=disks,
            nics=nics,
            serial_log=str(serial_dir / f"{name}.log") if serial_dir is not None else None,
            kernel=boot.kernel if boot else None,
            initrd=boot.initrd if boot else None,
            cmdline=boot.cmdline if boot and boot.cmdline else None,
            tb_cache_mib=TCG_TB_CACHE_MIB if self.settings.domain_type == "qemu" else None,
        )
        try:
            digest = spec_hash(spec)
        except DomainSpecError as error:
            raise TerminalError("InvalidSpec", f"VirtualMachine {name!r}: {error}") from None
        metadata = {
            "vm": name,
            "uid": vm.metadata.uid,
            "generation": str(vm.metadata.generation or 0),
            "node": self.node,
            "specHash": digest,
        }
        return replace(spec, metadata=metadata)

    def _disk_source(self, vm: VirtualMachine, disk: Disk, index: int) -> DiskSource:
        volume = disk.volume_ref()
        if volume is not None:
            return BlockSource(f"/dev/{volume.vg}/{volume.lv}")
        if disk.file is not None:
            return FileSource(disk.file)
        assert disk.iscsi is not None
        where = f"VirtualMachine {vm.metadata.name!r} spec.disks[{index}].iscsi"
        target = self.iscsi_targets.get(disk.iscsi.target)
        if not isinstance(target, IscsiTarget):
            raise TerminalError(
                "IscsiTargetNotFound", f"{where}: IscsiTarget {disk.iscsi.target!r} not found"
            )
        host, port = _split_portal(target.spec.portal)
        if ip_address(host).is_unspecified:  # listening everywhere: use its node's address
            server = self.nodes.get(target.spec.node)
            if not isinstance(server, ClusterNode):
                raise TerminalError(
                    "IscsiTargetNotFound",
                    f"{where}: node {target.spec.node!r} of IscsiTarget "
                    f"{disk.iscsi.target!r} not found",
                )
            host = str(server.spec.addresses.cluster)
        return IscsiSource(host, port, target.spec.iqn, disk.iscsi.lun)

    # -- placed here -------------------------------------------------------------------------

    async def _run(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo | None
    ) -> Result:
        desired = self.domain_spec(vm)
        name = vm.metadata.name
        if domain is not None and domain.state in ACTIVE_STATES:
            return await self._observe_running(vm, domain, desired)
        blocker = self.start_blocker()
        if blocker is not None:
            log.info("not starting %s on %s: %s", name, self.node, blocker)
            return Result(requeue_after=BLOCKED_RETRY)
        # Starting is decided on etcd's current copy, not the cache: a crash seen before the
        # cache caught up with our own "Running" report must still count as a restart.
        fresh = await self._fresh_if_placed_here(vm)
        if fresh is None:
            return Result()  # the cache was behind; the informer brings the change
        vm = fresh
        desired = self.domain_spec(vm)
        policy = vm.spec.restart_policy
        window_start = now() - timedelta(seconds=policy.window_seconds)
        restarts = [moment for moment in vm.status.restarts if moment > window_start]
        was_running = vm.status.node == self.node and vm.status.state == "Running"
        limit = vm.status.condition("RestartLimitReached")
        if vm.status.node == self.node and limit is not None and limit.status == "True":
            return Result()  # left down: stop and start the VM, or relocate it
        if was_running and len(restarts) >= policy.max_restarts:
            await self._release(await self._volumes(host, vm, domain), name)
            return await self._give_up(vm, restarts)
        if not await self._activate_volumes(vm):
            return Result(requeue_after=ACTIVATION_RETRY)
        try:
            await self._define(host, desired)
        except TerminalError:
            await self._release(vm_volumes(vm), name)
            raise
        try:
            await host.start(name)
        except DomainStateConflict:
            log.info("domain %s was already started on %s", name, self.node)
        except InvalidDefinition as error:
            await self._release(vm_volumes(vm), name)
            raise TerminalError("InvalidDefinition", str(error)) from None
        except LibvirtError as error:
            if isinstance(error, LibvirtUnavailable):
                raise
            await self.recorder.record(vm, "Warning", "StartFailed", "%s", str(error))
            raise RetryableError(str(error)) from None
        if was_running:
            restarts.append(now())
            await self.recorder.record(
                vm,
                "Warning",
                "VMRestarted",
                "domain stopped unexpectedly on %s; restarted in place (%d of %d in %d s)",
                self.node,
                len(restarts),
                policy.max_restarts,
                policy.window_seconds,
            )
        else:
            await self.recorder.record(vm, "Normal", "DomainStarted", "started on %s", self.node)
        started = await host.lookup(name)
        await self._patch_status(
            vm,
            lambda vm_: _set_running(vm_, self.node, started, desired, restarts),
        )
        return Result()

    async def _confirmed_elsewhere(self, vm: VirtualMachine) -> bool:
        """Whether etcd, read now, agrees the VM is not placed here and no migration owns it.

        The VM and migration caches are separate watches: right after a migration, this agent
        may see the placement switched on the migration before the VM's new placement arrives,
        and must not take the domain that just arrived for a straggler.
        """
        try:
            fresh = await self.store.get("VirtualMachine", vm.metadata.name)
            migrations, _ = await self.store.list_objects("VirtualMachineMigration")
        except NotFound:
            return True
        except StoreError as error:
            raise RetryableError(f"re-reading {vm.metadata.name}: {error}") from None
        if not isinstance(fresh, VirtualMachine) or fresh.metadata.uid != vm.metadata.uid:
            return True
        migrating = in_flight_migration(migrations, vm.metadata.name, self.node)
        return not self._placed_here(fresh) and migrating is None

    async def _fresh_if_placed_here(self, vm: VirtualMachine) -> VirtualMachine | None:
        """The VM as etcd has it now (a linearizable read) if it is still to run here, else None.

        The placement must carry the current term's token (the controller leader key's create
        revision, read in the same transaction): a placement of a deposed leader starts nothing
        until the new leader stamps it with its own.
        """
        name = vm.metadata.name
        try:
            fresh, term = await self.store.get_with_term(
                "VirtualMachine", name, leader_key(self.store.prefix, CONTROLLER_ELECTION)
            )
        except NotFound:
            return None
        except StoreError as error:
            raise RetryableError(f"re-reading {name} before start: {error}") from None
        still_here = (
            isinstance(fresh, VirtualMachine)
            and fresh.metadata.uid == vm.metadata.uid
            and fresh.metadata.deletion_timestamp is None
            and fresh.spec.run_state == "started"
            and self._placed_here(fresh)
        )
        if not still_here or not isinstance(fresh, VirtualMachine):
            return None
        placement = fresh.status.placement
        if placement is not None and placement.token != term:
            message = (
                f"not started on {self.node}: placed under term {placement.token}, "
                f"the controller's current term is {term or 'none'}"
            )
            await self._patch_status(
                fresh,
                lambda vm_: vm_.status.set_condition(
                    "Ready", "False", "WaitingForTerm", message, vm.metadata.generation
                ),
            )
            return None
        return fresh

    async def _observe_running(
        self, vm: VirtualMachine, domain: DomainInfo, desired: DomainSpec
    ) -> Result:
        if vm.status.node != self.node or vm.status.state not in ("Running", "Paused"):
            log.debug("adopting running domain %s on %s", vm.metadata.name, self.node)
        await self._keep_claims(vm)
        await self._patch_status(
            vm,
            lambda vm_: _set_running(vm_, self.node, domain, desired, list(vm_.status.restarts)),
        )
        return Result()

    async def _give_up(self, vm: VirtualMachine, restarts: list[datetime]) -> Result:
        policy = vm.spec.restart_policy
        message = (
            f"domain stopped unexpectedly on {self.node}: {len(restarts)} restarts within "
            f"{policy.window_seconds} s reached the limit of {policy.max_restarts}; left down"
        )

        def mutate(vm_: VirtualMachine) -> bool:
            status = vm_.status
            changed = status.set_condition(
                "RestartLimitReached", "True", "TooManyRestarts", message, vm_.metadata.generation
            )
            changed |= status.set_condition("Ready", "False", "Crashed", message)
            if (status.state, status.node, status.restarts) != ("Crashed", self.node, restarts):
                status.state, status.node, status.restarts = "Crashed", self.node, restarts
                changed = True
            return changed

        await self._patch_status(vm, mutate)
        await self.recorder.record(vm, "Warning", "RestartLimitReached", message)
        return Result()

    async def _stop(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo | None
    ) -> Result:
        name = vm.metadata.name
        volumes = await self._volumes(host, vm, domain)
        if domain is not None and domain.state in ACTIVE_STATES:
            timeout = vm.spec.shutdown_timeout_seconds
            clean = await host.shutdown(name, timeout)
            how = "shut down" if clean else f"destroyed after {timeout} s without shutting down"
            await self.recorder.record(vm, "Normal", "DomainStopped", "%s on %s", how, self.node)
        if domain is not None:
            desired = self.domain_spec(vm)
            inactive = parse_kvmctl_metadata(await host.domain_xml(name, inactive=True))
            if inactive.get("specHash") != desired.metadata["specHash"]:
                await self._define(host, desired)
        await self._release(volumes, name)
        reason = "Disabled" if vm.spec.run_state == "disabled" else "Stopped"

        def mutate(vm_: VirtualMachine) -> bool:
            status = vm_.status
            changed = status.set_condition(
                "Ready",
                "False",
                reason,
                f"runState is {reason.lower()}",
                observed_generation=vm.metadata.generation,
            )
            changed |= _drop_condition(vm_, "RestartLimitReached")
            changed |= _drop_condition(vm_, "RestartRequired")
            if (status.state, status.node, status.restarts) != ("Stopped", self.node, []):
                status.state, status.node, status.restarts = "Stopped", self.node, []
                changed = True
            return changed

        await self._patch_status(vm, mutate)
        return Result()

    async def _define(self, host: LibvirtHost, desired: DomainSpec) -> None:
        try:
            await host.define(build_domain_xml(desired))
        except InvalidDefinition as error:
            raise TerminalError("InvalidDefinition", str(error)) from None

    # -- not placed here, deleted, migrating -------------------------------------------------

    async def _remove_not_placed(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo
    ) -> None:
        placement = vm.status.placement
        where = f"placed on {placement.node}" if placement is not None else "not placed anywhere"
        if domain.state in ACTIVE_STATES:
            await _destroy(host, domain.name)
            log.warning("destroyed domain %s on %s: the VM is %s", domain.name, self.node, where)
            await self.recorder.record(
                vm,
                "Warning",
                "DomainStoppedNotPlacedHere",
                "destroyed the domain running on %s: the VM is %s",
                self.node,
                where,
            )
        await _undefine(host, domain.name)

    async def _remove_stale(
        self, host: LibvirtHost, domain: DomainInfo, vm: VirtualMachine | None
    ) -> None:
        """A kvmctl domain whose VM is gone (or was recreated with another uid)."""
        volumes = await self._volumes(host, None, domain)
        if domain.state in ACTIVE_STATES:
            await _destroy(host, domain.name)
            involved = vm or ObjectReference(kind="VirtualMachine", name=domain.name)
            await self.recorder.record(
                involved,
                "Warning",
                "DomainStoppedNotPlacedHere",
                "destroyed the domain running on %s: it belongs to a VirtualMachine "
                "that no longer exists",
                self.node,
            )
        await _undefine(host, domain.name)
        await self._release(volumes, domain.name)

    async def _delete(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo | None
    ) -> Result:
        volumes = await self._volumes(host, vm, domain)
        if domain is not None:
            if domain.state in ACTIVE_STATES:
                await _destroy(host, domain.name)
            await _undefine(host, domain.name)
            await self.recorder.record(vm, "Normal", "DomainDeleted", "undefined on %s", self.node)
        await self._release(volumes, vm.metadata.name)
        placement = vm.status.placement
        if placement is None or placement.node == self.node:
            await self.store.remove_finalizer("VirtualMachine", vm.metadata.name, FINALIZER)
        return Result()

    async def _leave_to_migration(
        self, vm: VirtualMachine, migration: VirtualMachineMigration
    ) -> Result:
        """A migration owns the domain: neither start nor destroy it."""
        await self._activate_incoming(vm, migration)
        if self._placed_here(vm) and migration.status.phase == "Running":

            def mutate(vm_: VirtualMachine) -> bool:
                if vm_.status.state == "Migrating":
                    return False
                vm_.status.state = "Migrating"
                return True

            await self._patch_status(vm, mutate)
        return Result()

    # -- LV activation -----------------------------------------------------------------------

    async def _activate_volumes(self, vm: VirtualMachine) -> bool:
        """Claim and activate the VM's LVs here; False (reported) if one cannot be.

        The LVs this attempt activated are released again, so a VM that cannot start holds none.
        """
        lvm = self.settings.lvm
        if lvm is None:
            return True
        activated: list[Volume] = []
        try:
            for vg, lv in vm_volumes(vm):
                holder = await self._fenced_holder(vg, lv)
                await activate_for_vm(self.store, lvm, vg, lv, self.node, take_over_from=holder)
                activated.append((vg, lv))
        except ACTIVATION_ERRORS as error:
            await self._release(activated, vm.metadata.name)
            await self._activation_failed(vm, f"not started on {self.node}: {error}")
            return False
        return True

    async def _fenced_holder(self, vg: str, lv: str) -> str | None:
        """The node holding the LV's claim when that node is Fenced (its claim may be taken)."""
        holder = await active_on(self.store, vg, lv)
        if holder is None or holder == self.node:
            return None
        node = self.nodes.get(holder)
        fenced = isinstance(node, ClusterNode) and node.status.health == "Fenced"
        return holder if fenced else None

    async def _activation_failed(self, vm: VirtualMachine, message: str) -> None:
        reason = "VolumeActivationFailed"
        new = False

        def mutate(vm_: VirtualMachine) -> bool:
            nonlocal new
            old = vm_.status.condition("Ready")
            new = old is None or (old.status, old.reason, old.message) != ("False", reason, message)
            return vm_.status.set_condition(
                "Ready", "False", reason, message, vm.metadata.generation
            )

        await self._patch_status(vm, mutate)
        if new:
            await self.recorder.record(vm, "Warning", reason, "%s", message)

    async def _keep_claims(self, vm: VirtualMachine) -> None:
        """A domain runs here: claim its LVs again where their claim is free (none is lost)."""
        lvm = self.settings.lvm
        if lvm is None:
            return
        for vg, lv in vm_volumes(vm):
            holder = await active_on(self.store, vg, lv)
            if holder == self.node:
                continue
            if holder is not None:
                log.warning(
                    "%s/%s of %s running on %s is claimed by %s",
                    vg,
                    lv,
                    vm.metadata.name,
                    self.node,
                    holder,
                )
                continue
            try:
                await activate_for_vm(self.store, lvm, vg, lv, self.node)
            except ACTIVATION_ERRORS as error:
                log.warning(
                    "claiming %s/%s of running %s again: %s", vg, lv, vm.metadata.name, error
                )

    async def _volumes(
        self, host: LibvirtHost, vm: VirtualMachine | None, domain: DomainInfo | None
    ) -> list[Volume]:
        """The LVs to release when the VM leaves: its own and those its domain here opens."""
        if self.settings.lvm is None:
            return []
        volumes = vm_volumes(vm) if vm is not None else []
        if domain is not None:
            try:
                xml = await host.domain_xml(domain.name)
            except DomainNotFound:
                return volumes
            volumes += [volume for volume in _block_volumes(xml) if volume not in volumes]
        return volumes

    async def _release(self, volumes: list[Volume], vm_name: str) -> None:
        """Deactivate and release the `volumes` this node holds, unless another VM here uses one."""
        lvm = self.settings.lvm
        if lvm is None or not volumes:
            return
        in_use = {
            volume
            for other in self.vms.list()
            if isinstance(other, VirtualMachine)
            and other.metadata.name != vm_name
            and self._placed_here(other)
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

    async def _activate_incoming(
        self, vm: VirtualMachine, migration: VirtualMachineMigration
    ) -> None:
        """Target of a Running migration: take the VM's LVs over from the source.

        `VolumesActivated` is set to Unknown before anything is done, so a failed migration's
        LVs are deactivated again whatever point this reached (`_release_failed_incoming`).
        """
        lvm = self.settings.lvm
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

    async def _release_failed_incoming(self, vm: VirtualMachine) -> None:
        """Deactivate here the LVs taken over for an incoming migration that failed."""
        lvm = self.settings.lvm
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

    # -- status ------------------------------------------------------------------------------

    async def _patch_status(self, vm: VirtualMachine, mutate: Callable[[Any], bool]) -> None:
        """Write status with `mutate`, only while the VM is still placed on this node."""

        def guarded(current: Any) -> bool:
            if not isinstance(current, VirtualMachine) or not self._placed_here(current):
                return False
            if current.metadata.uid != vm.metadata.uid:
                return False
            return mutate(current)

        try:
            await self.store.patch_status("VirtualMachine", vm.metadata.name, guarded)
        except NotFound:
            return
        except StoreError as error:
            raise RetryableError(f"writing status of {vm.metadata.name}: {error}") from None


def _set_running(
    vm: VirtualMachine,
    node: str,
    domain: DomainInfo | None,
    desired: DomainSpec,
    restarts: list[datetime],
) -> bool:
    status = vm.status
    metadata = domain.metadata if domain is not None else {}
    current = metadata.get("specHash") == desired.metadata["specHash"]
    if current:
        running_generation = vm.metadata.generation
        changed = status.set_condition(
            "RestartRequired", "False", "UpToDate", "", vm.metadata.generation
        )
    else:
        generation = metadata.get("generation", "")
        running_generation = int(generation) if generation.isdigit() else None
        changed = status.set_condition(
            "RestartRequired",
            "True",
            "SpecChanged",
            "the spec changed while the domain runs; it applies at the next start",
            vm.metadata.generation,
        )
    paused = domain is not None and domain.state is DomainState.PAUSED
    state: Literal["Paused", "Running"] = "Paused" if paused else "Running"
    changed |= status.set_condition("Ready", "True", state, f"{state.lower()} on {node}")
    changed |= _drop_condition(vm, "RestartLimitReached")
    new = (state, node, domain.uuid if domain else None, running_generation, restarts)
    old = (
        status.state,
        status.node,
        status.domain_uuid,
        status.running_generation,
        status.restarts,
    )
    if new != old:
        (
            status.state,
            status.node,
            status.domain_uuid,
            status.running_generation,
            status.restarts,
        ) = new
        changed = True
    return changed


def _activating(migration: VirtualMachineMigration) -> bool:
    condition = migration.status.condition(VOLUMES_ACTIVATED)
    return condition is not None and condition.reason == "Activating"


def _not_released(migration: VirtualMachineMigration) -> bool:
    condition = migration.status.condition(VOLUMES_ACTIVATED)
    return condition is not None and condition.reason != "Released"


def _block_volumes(domain_xml: str) -> list[Volume]:
    """The LVs (`/dev/VG/LV` block sources) a domain's disks open."""
    volumes: list[Volume] = []
    for source in ET.fromstring(domain_xml).iterfind("devices/disk[@type='block']/source"):
        parts = PurePosixPath(source.get("dev", "")).parts
        if len(parts) == 4 and parts[:2] == ("/", "dev") and (parts[2], parts[3]) not in volumes:
            volumes.append((parts[2], parts[3]))
    return volumes


def _drop_condition(vm: VirtualMachine, type_: str) -> bool:
    before = len(vm.status.conditions)
    vm.status.conditions = [c for c in vm.status.conditions if c.type != type_]
    return len(vm.status.conditions) != before


async def _destroy(host: LibvirtHost, name: str) -> None:
    with contextlib.suppress(DomainNotFound, DomainStateConflict):  # already gone or off
        await host.destroy(name)


async def _undefine(host: LibvirtHost, name: str) -> None:
    try:
        await host.undefine(name)
    except DomainNotFound:
        pass
    except LibvirtError as error:
        if isinstance(error, LibvirtUnavailable):
            raise
        log.warning("undefining domain %s on %s failed: %s", name, host.uri, error)
