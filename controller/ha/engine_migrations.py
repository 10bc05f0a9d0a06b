"""Migrations: an operator's requests, draining a cordoned node, failback, NodeDrained."""

from __future__ import annotations

from .engine_core import EngineCore
from .environment import (
    ClearMigration,
    Migrate,
    NodeView,
    VmView,
)
from .placement import choose_node, domain_rank, ineligibility


class EngineMigrations(EngineCore):
    """Live migrations the engine starts or answers, and the drain reports."""

    def _migrate(self, vm: VmView, source: str, target: str) -> None:
        self._usage.add(vm.name, vm.spec, target)
        self._migrations += 1
        self._actions.append(Migrate(vm.name, source, target))

    def _requested_migration(self, vm: VmView, target: str) -> bool:
        """Handle an operator's migration request; True when it is still waiting its turn."""
        placement = self._placement[vm.name]
        refusal: str | None = None
        if placement is None or vm.state != "Running" or self._health.get(placement) != "Online":
            refusal = "the VM is not running on an Online node"
        elif not vm.spec.migration.allowed:
            refusal = "live migration is not allowed for this VM"
        elif target == placement:
            refusal = f"the VM already runs on {target}"
        elif target not in self._world.nodes:
            refusal = f"no node named {target}"
        else:
            refusal = ineligibility(
                vm.name, vm.spec, self._nodes[target], self._usage, self._world.vms
            )
        if refusal is not None:
            self._actions.append(ClearMigration(vm.name))
            self._emit(vm, "MigrationRejected", f"to {target}: {refusal}", "Warning")
            return False
        if self._migrations >= self.timings.max_parallel_migrations:
            return True
        assert placement is not None
        self._migrate(vm, placement, target)
        self._emit(vm, "VMMigrating", f"requested: live-migrating from {placement} to {target}")
        return True

    def _drain(self, vm: VmView, node: NodeView) -> None:
        if self._migrations >= self.timings.max_parallel_migrations:
            return
        target, why = choose_node(vm, self._nodes, self._world.vms, self._usage, {node.name})
        if target is None:
            self._report(vm, "VMNotMigratable", f"cannot leave {node.name}: {why}")
        elif vm.spec.migration.allowed:
            self._migrate(vm, node.name, target)
            self._emit(vm, "VMMigrating", f"draining {node.name}: live-migrating to {target}")
        elif node.drain == "force":
            self._place(vm, None)
            message = f"draining {node.name} with force: stopping it to restart elsewhere"
            self._emit(vm, "VMStopped", message, "Warning")
        else:
            message = (
                f"live migration is not allowed: left on {node.name} "
                "(drain with --force stops it and restarts it elsewhere)"
            )
            self._report(vm, "VMNotMigratable", message)

    def _failback(self, vm: VmView, current: str) -> None:
        if not vm.spec.migration.allowed:
            return
        if self._migrations >= self.timings.max_parallel_migrations:
            return
        target, _ = choose_node(vm, self._nodes, self._world.vms, self._usage, {current})
        if target is None or domain_rank(vm.spec, target) >= domain_rank(vm.spec, current):
            return
        self._migrate(vm, current, target)
        self._emit(vm, "VMFailback", f"live-migrating from {current} back to preferred {target}")

    def _report_drains(self) -> None:
        for node in sorted(self._world.nodes.values(), key=lambda n: n.name):
            if node.drain is None or not node.spec.cordoned:
                self._drained.discard(node.name)
                continue
            busy = any(p == node.name for p in self._placement.values()) or any(
                vm.migration is not None and vm.migration.source == node.name
                for vm in self._world.vms.values()
            )
            if not busy and node.name not in self._drained:
                self._drained.add(node.name)
                self._emit(node, "NodeDrained", "no VM is placed on the node")
