"""Disks and MAC addresses that only one VM may use: what each VM claims, and who else does.

A disk (by its canonical source, `Disk.source()`) may be shared only when every VM using it has
it readonly: a shared ISO or CD-ROM image is legitimate, one writer beside any other user is not.
A MAC address is never shared. One VM using a disk or MAC twice is refused by the model itself.

Checked twice: at apply, for the batch against itself and the store (`controller/apply.py`), and
by the HA engine before it places a VM, disks only (`controller/ha/engine.py`), so that a store
written by hand or by an older version never gets two writers on one disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from crds.virtualmachine import VirtualMachineSpec


@dataclass(frozen=True)
class Clash:
    vm: str
    other: str
    """The VM that already claims `resource`."""
    resource: str
    """`disk volume vg/lv`, `disk file /path`, `disk iscsi T lun N` or `MAC address 52:..`."""

    @property
    def rule(self) -> str:
        if self.resource.startswith("disk "):
            return "a disk may be shared only when every VM using it has it readonly"
        return "a MAC address must be unique"


Resources = list[tuple[str, bool]]
"""What a VM claims: (resource, whether it would share it: a readonly disk)."""


class Claims:
    """Who uses which disk (and, with `macs`, which MAC address)."""

    def __init__(self, macs: bool = True) -> None:
        self._macs = macs
        self._users: dict[str, list[tuple[str, bool]]] = {}
        """Resource -> (VM, whether that VM would share it: a readonly disk)."""
        self._added: set[str] = set()

    def resources(self, spec: VirtualMachineSpec) -> Resources:
        """What `spec` claims: (resource, whether it would share it: a readonly disk)."""
        found = [(f"disk {disk.source()}", disk.readonly) for disk in spec.disks]
        if self._macs:
            found += [(f"MAC address {nic.mac.lower()}", False) for nic in spec.nics if nic.mac]
        return found

    def clash(
        self, vm: str, spec: VirtualMachineSpec, resources: Resources | None = None
    ) -> Clash | None:
        """The first resource of `spec` (`resources(spec)` if given) that another VM claims in
        a way that excludes `vm`."""
        for resource, shared in self.resources(spec) if resources is None else resources:
            for other, other_shared in self._users.get(resource, []):
                if other != vm and not (shared and other_shared):
                    return Clash(vm, other, resource)
        return None

    def add(self, vm: str, spec: VirtualMachineSpec, resources: Resources | None = None) -> None:
        """Record what `vm` uses (once per VM: adding it again changes nothing)."""
        if vm in self._added:
            return
        self._added.add(vm)
        for resource, shared in self.resources(spec) if resources is None else resources:
            self._users.setdefault(resource, []).append((vm, shared))


class KnownResources:
    """`Claims.resources` of each VM, computed again only when its spec object changes (specs
    are not mutated), so that a loop over many VMs does not rebuild them every time."""

    def __init__(self, claims: Claims) -> None:
        self._claims = claims
        self._known: dict[str, tuple[VirtualMachineSpec, Resources]] = {}

    def of(self, vm: str, spec: VirtualMachineSpec) -> Resources:
        known = self._known.get(vm)
        if known is not None and known[0] is spec:
            return known[1]
        resources = self._claims.resources(spec)
        self._known[vm] = (spec, resources)
        return resources
