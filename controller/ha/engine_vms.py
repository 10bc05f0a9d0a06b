"""VM decisions: start, stop, recover, restart policy, disk conflicts and admission hold."""

from __future__ import annotations

from dataclasses import replace

from controller.exclusive import Clash

from .admission import check, plan
from .engine_migrations import EngineMigrations
from .environment import (
    ClearMigration,
    Restart,
    SetAdmissionHold,
    SetDiskConflict,
    SetFailed,
    VmView,
)
from .placement import choose_node


class VmDecisions(EngineMigrations):
    """The VM half of a step: where each VM should run, and what to do when it cannot."""

    def _report_disk_conflict(self, vm: VmView, clash: Clash) -> None:
        """Record (condition, then Warning) that `vm` is left Pending for another's disk."""
        message = (
            f"{clash.resource} is in use by {clash.other} ({clash.rule}): not placed until "
            f"{clash.other} no longer uses it"
        )
        self._disk_blocked.add(vm.name)
        if vm.disk_conflict != message:
            self._actions.append(SetDiskConflict(vm.name, message))
        self._report(vm, "DiskConflict", message)

    def _holds_disks(self, vm: VmView) -> bool:
        """Placed (even on a fenced node: recovering keeps the disk), or may run somewhere."""
        return self._placement[vm.name] is not None or bool(self._may_run_on(vm))

    def _may_run_on(self, vm: VmView) -> set[str]:
        """Nodes that may be running (or starting) `vm` and are not known to be fenced."""
        hosts = set(self._reported_on.get(vm.name, ()))
        placement = self._placement[vm.name]
        awaiting_restart = vm.state == "Crashed" and not self._restarted_since_crash(vm)
        if placement is not None and not awaiting_restart:
            hosts.add(placement)
        if vm.migration is not None and vm.migration.phase in ("Running", "Succeeded"):
            hosts.update((vm.migration.source, vm.migration.target))
        return {h for h in hosts if self._health.get(h) != "Fenced"}

    @staticmethod
    def _restarted_since_crash(vm: VmView) -> bool:
        return vm.crashed_at is None or any(t >= vm.crashed_at for t in vm.restarts)

    def _vm_step(self, vm: VmView) -> None:
        if vm.spec.run_state != "started":
            self._stop(vm)
            return
        if vm.failed:
            return
        migration = vm.migration
        if migration is not None:
            if migration.phase == "Running":
                return
            if migration.phase == "Succeeded":
                self._place(vm, migration.target)
                self._actions.append(ClearMigration(vm.name))
                message = f"live-migrated from {migration.source} to {migration.target}"
                self._emit(vm, "VMMigrated", message)
                return
            if migration.phase == "Failed":
                self._actions.append(ClearMigration(vm.name))
                message = f"{migration.source} to {migration.target}: {migration.message}"
                self._emit(vm, "MigrationFailed", message, "Warning")
            elif migration.phase == "Pending" and self._requested_migration(vm, migration.target):
                return
        placement = self._placement[vm.name]
        if placement is None:
            self._start_somewhere(vm)
            return
        health = self._health.get(placement)
        if health == "Fenced" or placement not in self._world.nodes:
            self._recover(vm, placement)
            return
        clash = self._disks.clash(vm)
        if clash is not None:  # placed as a second writer: a store written by hand or by old code
            self._place(vm, None)
            self._report_disk_conflict(vm, clash)
            return
        if health != "Online":
            return
        node = self._world.nodes[placement]
        if vm.name in self._recovering and vm.state == "Running":
            self._recovering.discard(vm.name)
            self._emit(vm, "VMRecovered", f"running on {placement}")
        if vm.state == "Crashed" and not self._restarted_since_crash(vm):
            self._restart_policy(vm, placement)
        elif vm.state == "Running" and node.spec.cordoned and node.drain is not None:
            self._drain(vm, node)
        elif vm.state == "Running" and vm.spec.failover_domain.failback:
            self._failback(vm, placement)

    def _stop(self, vm: VmView) -> None:
        if vm.migration is not None and vm.migration.phase in ("Pending", "Failed"):
            self._actions.append(ClearMigration(vm.name))
        if self._placement[vm.name] is not None:
            self._place(vm, None)
            self._emit(vm, "VMStopped", f"runState is {vm.spec.run_state}")
        if vm.failed or vm.restarts or vm.relocations:
            self._actions.append(SetFailed(vm.name, False))
        self._recovering.discard(vm.name)

    def _blocked(self, vm: VmView, target: str | None = None) -> bool:
        """True (and reported) when some unfenced node other than `target` may still run it."""
        others = sorted(self._may_run_on(vm) - {target})
        if others:
            self._report(vm, "VMPending", f"may still run on {', '.join(others)}")
        return bool(others)

    def _start_somewhere(self, vm: VmView) -> None:
        clash = self._disks.clash(vm)
        if clash is not None:
            self._report_disk_conflict(vm, clash)
            return
        if self._blocked(vm):
            return
        target, why = choose_node(vm, self._nodes, self._world.vms, self._usage)
        if target is None:
            self._report(vm, "VMPending", f"no node can run it: {why}")
            return
        if self._held_by_admission(vm, target):
            return
        self._place(vm, target)
        self._emit(vm, "VMPlaced", f"placed on {target}")

    def _current_views(self, placed_only: bool) -> dict[str, VmView]:
        """The VMs where this step has them (only the placed ones, or all)."""
        return {
            name: replace(view, placement=self._placement[name])
            for name, view in self._world.vms.items()
            if not placed_only or self._placement[name] is not None
        }

    def _held_by_admission(self, vm: VmView, target: str) -> bool:
        """Hold (enforce) or warn about (warn) a start after which the policy is not met.

        VMs placed on lost hosts count as placed wherever they could be recovered, so a start
        never takes the room a recovery needs; a VM this engine is recovering is not checked."""
        policy = self._world.admission
        if policy is None or vm.name in self._recovering:
            return False
        if not self._planned:
            self._planned = True
            self._plan = plan(policy, self._nodes, self._current_views(placed_only=False))
        if self._plan is not None and self._plan.get(vm.name) == target:
            return False
        placed = self._current_views(placed_only=True)
        after = check(policy, self._nodes, {**placed, vm.name: replace(vm, placement=target)})
        if after.ok:
            return False
        message = f"starting it on {target} would break admission control ({policy.describe()})"
        message = f"{message}: {after.reason}"
        if policy.mode == "warn":
            self._emit(vm, "AdmissionWarning", message, "Warning")
            return False
        self._held.add(vm.name)
        if vm.admission_hold != message:
            self._actions.append(SetAdmissionHold(vm.name, message))
        self._report(vm, "AdmissionHeld", message)
        return True

    def _recover(self, vm: VmView, lost: str) -> None:
        hosts = self._may_run_on(vm)
        if len(hosts) == 1:
            (host,) = hosts
            if self._health.get(host) == "Online" and vm.name in self._world.nodes[host].domains:
                self._place(vm, host)
                self._emit(vm, "VMAdopted", f"{lost} is fenced and the VM runs on {host}")
                return
        if self._blocked(vm):
            return
        clash = self._disks.clash(vm)
        if clash is not None:
            self._place(vm, None)
            self._report_disk_conflict(vm, clash)
            return
        target, why = choose_node(vm, self._nodes, self._world.vms, self._usage)
        self._recovering.add(vm.name)
        if target is None:
            self._place(vm, None)
            self._report(vm, "VMPending", f"no node can run it: {why}")
            return
        self._place(vm, target)
        self._emit(vm, "VMRelocating", f"{lost} is fenced; recovering on {target}", "Warning")

    def _restart_policy(self, vm: VmView, node: str) -> None:
        policy = vm.spec.restart_policy
        window = policy.window_seconds
        recent = [t for t in vm.restarts if t > self._now - window]
        if len(recent) < policy.max_restarts:
            self._actions.append(Restart(vm.name))
            message = f"crashed; restart {len(recent) + 1} of {policy.max_restarts} in {window}s"
            self._emit(vm, "VMRestarted", f"{message} on {node}", "Warning")
            return
        self._wake_at(min(recent) + window)  # a restart in place is allowed again then
        if vm.relocations < policy.max_relocations:
            if self._blocked(vm):
                return
            target, why = choose_node(vm, self._nodes, self._world.vms, self._usage, {node})
            if target is None:
                self._report(vm, "VMPending", f"restart limit reached; cannot relocate: {why}")
                return
            self._place(vm, target, relocation=True)
            message = (
                f"crashed again after {len(recent)} restarts in {window}s on {node}; relocation "
                f"{vm.relocations + 1} of {policy.max_relocations} to {target}"
            )
            self._emit(vm, "VMRelocating", message, "Warning")
            return
        self._actions.append(SetFailed(vm.name, True))
        self._place(vm, None)
        message = (
            f"crashed after {len(recent)} restarts and {vm.relocations} relocations: left Failed "
            "(set runState to stopped, then started, to try again)"
        )
        self._emit(vm, "VMFailed", message, "Warning")
