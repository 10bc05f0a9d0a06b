"""The HA decision engine: node health, fencing, recovery, restart policy, drain and failback.

`Engine.step(world)` reads one snapshot and returns the actions to take; `engine_loop.run`
loops it over an `Environment`. The engine keeps only transient state (fence attempts in flight,
retry backoff, which warnings it already reported): everything that matters for safety is in the
world (node health and fence confirmation, placements), so a new leader carries on from the
stored objects. docs/ha.md states the rules and why they are safe.

The parts: `engine_nodes.py` (node health and fencing), `engine_vms.py` (VM decisions),
`engine_migrations.py` (migrations, drains, failback), over the state in `engine_core.py`.
"""

from __future__ import annotations

from dataclasses import replace

from crds.clusternode import NodeHealth

from .engine_nodes import NodeDecisions
from .engine_vms import VmDecisions
from .environment import (
    Action,
    SetAdmissionHold,
    SetDiskConflict,
    World,
    silent_nodes,
)
from .placement import DiskHolders, Usage


class Engine(NodeDecisions, VmDecisions):
    """The pure HA engine: one `step` decides about nodes first, then VMs, then drains."""

    # The step ---------------------------------------------------------------------------------

    def step(self, world: World) -> list[Action]:
        """Decide what to do about `world`; the caller applies the actions in order."""
        self._world = world
        self._actions: list[Action] = []
        self._health: dict[str, NodeHealth] = {n.name: n.health for n in world.nodes.values()}
        self._placement: dict[str, str | None] = {v.name: v.placement for v in world.vms.values()}
        self._usage = Usage(world.vms.values())
        self._migrations = sum(
            1 for v in world.vms.values() if v.migration and v.migration.phase == "Running"
        )
        self.next_wakeup = None
        heard = {n.name: n.heard for n in world.nodes.values()}
        self._silent = silent_nodes(heard, world.now, self.timings.suspect_after)
        emits, storage_wake = self._storage.step(world, self._usage)
        self._actions.extend(emits)
        if storage_wake is not None:
            self._wake_at(storage_wake)
        for node in sorted(world.nodes.values(), key=lambda n: n.name):
            self._node_step(node)
        self._nodes = {
            name: replace(view, health=self._health[name]) for name, view in world.nodes.items()
        }
        self._reported_on: dict[str, set[str]] = {}
        """VM -> the nodes whose agent reports a domain of it."""
        for node in world.nodes.values():
            for name in node.domains:
                self._reported_on.setdefault(name, set()).add(node.name)
        self._disks = DiskHolders(
            (v for v in world.vms.values() if self._holds_disks(v)), self._known
        )
        self._disk_blocked: set[str] = set()
        self._held: set[str] = set()
        self._plan: dict[str, str] | None = None
        self._planned = False
        for vm in sorted(world.vms.values(), key=lambda v: (-v.spec.priority, v.name)):
            self._vm_step(vm)
            if vm.disk_conflict is not None and vm.name not in self._disk_blocked:
                self._actions.append(SetDiskConflict(vm.name, None))
            if vm.admission_hold is not None and vm.name not in self._held:
                self._actions.append(SetAdmissionHold(vm.name, None))
        self._report_drains()
        return self._actions
