"""Where a VM may run and where it should: eligibility, capacity, anti-affinity, preference.

Pure functions over the engine's `World`. A node is eligible for a VM when it is Online with a
live lease, not cordoned, in the failover domain if the domain is restricted, has room for the
VM's vcpus and memory, has none of the VM's storage paths reported lost (docs/ha.md,
"Storage-path loss"), and runs no VM the VM is anti-affine with (either side may name the
other). Eligible nodes are ranked by domain preference (ordered domains: priority 1 first;
unordered: every member alike; non-members last), then by memory use after placing (least
loaded first), then by name, so decisions are deterministic.

Disks are exclusive (`controller/exclusive.py`): a VM is not placed while another VM that may
run holds one of its disks. `DiskHolders` says who holds what in one step of the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controller.exclusive import Claims, Clash, KnownResources
from crds.virtualmachine import VirtualMachineSpec

from .environment import NodeView, VmView

OUTSIDE_DOMAIN = 1000
"""Rank of a node outside the VM's failover domain (domain priorities are 1..100)."""


@dataclass
class NodeUsage:
    cpus: int = 0
    memory_mib: int = 0
    vms: set[str] = field(default_factory=set)


class Usage:
    """What each node has committed: placed VMs plus reserved migration targets."""

    def __init__(self, vms: Iterable[VmView]) -> None:
        self.by_node: dict[str, NodeUsage] = {}
        self._named_by: dict[str, set[str]] = {}
        self._named_by_of: Mapping[str, VmView] | None = None
        for vm in vms:
            if vm.placement is not None and not vm.failed:
                self.add(vm.name, vm.spec, vm.placement)
            migration = vm.migration
            if (
                migration is not None
                and migration.phase in ("Running", "Succeeded")
                and migration.target != vm.placement
            ):
                self.add(vm.name, vm.spec, migration.target)

    def of(self, node: str) -> NodeUsage:
        return self.by_node.setdefault(node, NodeUsage())

    def add(self, vm: str, spec: VirtualMachineSpec, node: str) -> None:
        usage = self.of(node)
        if vm in usage.vms:
            return
        usage.vms.add(vm)
        usage.cpus += spec.vcpus
        usage.memory_mib += spec.memory_mib

    def remove(self, vm: str, spec: VirtualMachineSpec, node: str) -> None:
        usage = self.of(node)
        if vm not in usage.vms:
            return
        usage.vms.discard(vm)
        usage.cpus -= spec.vcpus
        usage.memory_mib -= spec.memory_mib

    def named_by(self, name: str, vms: Mapping[str, VmView]) -> set[str]:
        """The VMs of `vms` whose spec names `name` as anti-affine. The reverse index is built
        once per `vms` mapping (one per engine step), not once per node looked at: placing
        2,000 new VMs on 50 hosts otherwise compared every pair (about two million checks)."""
        if self._named_by_of is not vms:
            self._named_by = {}
            for vm in vms.values():
                for other in vm.spec.anti_affinity:
                    self._named_by.setdefault(other, set()).add(vm.name)
            self._named_by_of = vms
        return self._named_by.get(name, set())


def domain_rank(spec: VirtualMachineSpec, node: str) -> int:
    """Lower is more preferred."""
    domain = spec.failover_domain
    for member in domain.nodes:
        if member.name == node:
            return member.priority if domain.ordered else 1
    return OUTSIDE_DOMAIN


def ineligibility(
    name: str,
    spec: VirtualMachineSpec,
    node: NodeView,
    usage: Usage,
    vms: Mapping[str, VmView],
) -> str | None:
    """Why `node` cannot take VM `name` now, or None if it can."""
    if node.health != "Online":
        return f"{node.name} is {node.health}"
    if not node.lease_alive:
        return f"{node.name} has no lease"
    if node.spec.cordoned:
        return f"{node.name} is cordoned"
    if spec.failover_domain.restricted and domain_rank(spec, node.name) == OUTSIDE_DOMAIN:
        return f"{node.name} is outside the restricted failover domain"
    if node.storage_lost:
        lost = sorted(spec.storage_paths() & node.storage_lost.keys())
        if lost:
            return f"{node.name} lost storage path {', '.join(lost)}"
    used = usage.of(node.name)
    if name not in used.vms:
        if node.cpus is not None and used.cpus + spec.vcpus > node.cpus:
            return f"{node.name} has {node.cpus - used.cpus} free vcpus of {spec.vcpus} needed"
        if node.memory_mib is not None and used.memory_mib + spec.memory_mib > node.memory_mib:
            free = node.memory_mib - used.memory_mib
            return f"{node.name} has {free} MiB free of {spec.memory_mib} MiB needed"
    partners = set(spec.anti_affinity) | usage.named_by(name, vms)
    conflicts = [
        other
        for other in partners
        if other != name and other in vms and (other in used.vms or other in node.domains)
    ]
    if conflicts:
        return f"{node.name} runs {min(conflicts)} (anti-affinity)"
    return None


def _load_after(spec: VirtualMachineSpec, node: NodeView, usage: Usage) -> float:
    if node.memory_mib is None:
        return 0.0
    return (usage.of(node.name).memory_mib + spec.memory_mib) / node.memory_mib


def choose_node(
    vm: VmView,
    nodes: Mapping[str, NodeView],
    vms: Mapping[str, VmView],
    usage: Usage,
    exclude: Iterable[str] = (),
) -> tuple[str | None, str]:
    """The best eligible node for `vm`, or None with the reasons every node was refused."""
    excluded = set(exclude)
    eligible: list[tuple[int, float, str]] = []
    refusals: list[str] = []
    for node in sorted(nodes.values(), key=lambda n: n.name):
        if node.name in excluded:
            continue
        reason = ineligibility(vm.name, vm.spec, node, usage, vms)
        if reason is None:
            eligible.append(
                (domain_rank(vm.spec, node.name), _load_after(vm.spec, node, usage), node.name)
            )
        else:
            refusals.append(reason)
    if not eligible:
        return None, "; ".join(refusals) or "no nodes"
    return min(eligible)[2], ""


class DiskHolders:
    """The disks of the VMs that are placed or may run somewhere, and which of those came second.

    Of two such VMs on one disk the first keeps it: a running (or migrating) VM before one that
    is not, then the engine's order (higher priority, then name). A VM neither placed nor
    running holds nothing, so it never takes a disk from one that is.
    """

    def __init__(self, holders: Iterable[VmView], known: KnownResources | None = None) -> None:
        self._claims = Claims(macs=False)
        self._known = known or KnownResources(self._claims)
        self._holders: dict[str, Clash | None] = {}
        ranked = sorted(
            holders,
            key=lambda v: (v.state not in ("Running", "Migrating"), -v.spec.priority, v.name),
        )
        for vm in ranked:
            resources = self._known.of(vm.name, vm.spec)
            self._holders[vm.name] = self._claims.clash(vm.name, vm.spec, resources)
            self._claims.add(vm.name, vm.spec, resources)

    def clash(self, vm: VmView) -> Clash | None:
        """Why `vm` must not run now (a disk another VM holds first), or None."""
        if vm.name in self._holders:
            return self._holders[vm.name]
        return self._claims.clash(vm.name, vm.spec, self._known.of(vm.name, vm.spec))

    def add(self, vm: VmView) -> None:
        """`vm` was just placed: it holds its disks from now on."""
        self._claims.add(vm.name, vm.spec, self._known.of(vm.name, vm.spec))
