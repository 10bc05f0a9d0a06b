"""Which VirtualMachines concern one host's agent: its VM controller's predicate.

Every agent caches every VM (one informer over the kind), but reconciling each of them at each
resync makes an agent's work grow with the cluster rather than with its host. A VM concerns
node N's agent when:

- it is placed on N (start, keep, stop it here);
- a kvmctl domain of it is on N's host, running or only defined (the agent must end a domain
  of a VM placed elsewhere, or of no VM at all): the domains the agent listed at its last
  libvirt connection, plus those libvirt events named since, minus those undefined since;
- a VirtualMachineMigration of it has N as its target or its source (the hand-over, or taking
  back what a failed incoming migration took);
- or it concerned N when it was last looked at: one more reconcile after it stops concerning
  N (placed away, say), so that what N held for it (LV claims) is released.

Keys from the libvirt source bypass the predicate (`Source.unfiltered`): a domain's VM may be
gone from the cache, and the reconciler then removes the stale domain.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.runtime.informer import Informer
from crds import AnyResource, VirtualMachine, VirtualMachineMigration
from reconcilers.drivers.libvirt import DomainEvent, LifecycleEvent, LifecycleEventKind


class NodeVms:
    """The predicate of node `node`'s VM controller; see the module docstring."""

    def __init__(self, node: str, migrations: Informer) -> None:
        self.node = node
        self.migrations = migrations
        self.domains: set[str] = set()
        """The VMs with a kvmctl domain on this host (defined or running)."""
        self._concerned: set[str] = set()

    def listed(self, vms: Iterable[str]) -> None:
        """The VMs of the kvmctl domains libvirt lists on this host now."""
        self.domains = set(vms)

    def domain_event(self, event: DomainEvent) -> None:
        if isinstance(event, LifecycleEvent) and event.event == LifecycleEventKind.UNDEFINED:
            self.domains.discard(event.name)
        else:
            self.domains.add(event.name)

    def concerns(self, vm: AnyResource) -> bool:
        """Whether node `node`'s agent reconciles `vm` (the Controller's `predicate`)."""
        name = vm.metadata.name
        if self._concerns_now(vm):
            self._concerned.add(name)
            return True
        if name in self._concerned:
            self._concerned.discard(name)
            return True  # one last look: it just stopped concerning this node
        return False

    def _concerns_now(self, vm: AnyResource) -> bool:
        if not isinstance(vm, VirtualMachine):
            return False
        name = vm.metadata.name
        placement = vm.status.placement
        if (placement is not None and placement.node == self.node) or name in self.domains:
            return True
        return any(
            isinstance(m, VirtualMachineMigration)
            and m.spec.vm == name
            and self.node in (m.spec.target_node, m.status.source_node)
            for m in self.migrations.list()
        )
