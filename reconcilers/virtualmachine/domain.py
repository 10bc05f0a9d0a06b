"""The libvirt domain of a VirtualMachine: its definition on this host, and the calls that end it.

The domain's metadata carries the VM's name, uid, generation, node and `specHash` (a hash of the
definition without the metadata), so a spec change is noticed whatever field changed and only
when it changes the domain. Domains without kvmctl owner metadata (`uid`) are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import string
from dataclasses import dataclass, replace
from ipaddress import ip_address
from pathlib import Path

from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer
from controller.runtime.reconcile import RetryableError, TerminalError
from crds import ClusterNode, IscsiTarget, VirtualMachine
from crds.event import ObjectReference
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
from reconcilers.lvm_lock import LvmSettings

log = logging.getLogger(__name__)

TCG_TB_CACHE_MIB = 16
"""TCG's translation cache for `qemu` domains: QEMU's default (1 GiB) would dominate RSS."""
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


class DomainBuilder:
    """The domain definitions of node `node`, resolving iSCSI disks through the caches."""

    def __init__(
        self, node: str, settings: DomainSettings, iscsi_targets: Informer, nodes: Informer
    ) -> None:
        self.node = node
        self.settings = settings
        self.iscsi_targets = iscsi_targets
        self.nodes = nodes

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
        boot, health = vm.spec.boot, vm.spec.health
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
            watchdog_action=health.watchdog.action if health.watchdog is not None else None,
            guest_agent=health.guest_agent is not None,
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


async def define(host: LibvirtHost, desired: DomainSpec) -> None:
    try:
        await host.define(build_domain_xml(desired))
    except InvalidDefinition as error:
        raise TerminalError("InvalidDefinition", str(error)) from None


async def destroy(host: LibvirtHost, name: str) -> None:
    with contextlib.suppress(DomainNotFound, DomainStateConflict):  # already gone or off
        await host.destroy(name)


async def undefine(host: LibvirtHost, name: str) -> None:
    try:
        await host.undefine(name)
    except DomainNotFound:
        pass
    except LibvirtError as error:
        if isinstance(error, LibvirtUnavailable):
            raise
        log.warning("undefining domain %s on %s failed: %s", name, host.uri, error)


async def remove_unwanted(
    host: LibvirtHost,
    recorder: EventRecorder,
    node: str,
    domain: DomainInfo,
    involved: VirtualMachine | ObjectReference,
    why: str,
) -> None:
    """Destroy (if running) and undefine a domain this node must not run; a Warning says why."""
    if domain.state in ACTIVE_STATES:
        await destroy(host, domain.name)
        log.warning("destroyed domain %s on %s: %s", domain.name, node, why)
        await recorder.record(
            involved,
            "Warning",
            "DomainStoppedNotPlacedHere",
            "destroyed the domain running on %s: %s",
            node,
            why,
        )
    await undefine(host, domain.name)


async def destroy_every_domain(host: LibvirtHost) -> list[str]:
    """Destroy every running kvmctl domain of `host` (libvirt only, no etcd); the VMs destroyed.

    Used to self-fence and to clean a node found Fenced. Every domain is tried; if one could
    not be destroyed (other than being gone or off already) the first error is raised at the
    end, so the caller never takes the host for clean (a self-fence then stops the watchdog).
    """
    destroyed: list[str] = []
    failed: LibvirtError | None = None
    for domain in await host.list_domains():
        if domain.metadata.get("uid") and domain.state in ACTIVE_STATES:
            try:
                await destroy(host, domain.name)
            except LibvirtError as error:
                failed = failed or error
                continue
            destroyed.append(domain.metadata.get("vm", domain.name))
    if failed is not None:
        raise failed
    return destroyed
