"""The HA engine's `World` as one term sees it: nodes, VMs, migrations (`EtcdEnvironment.observe`).

Node views combine the ClusterNode, its heartbeat key, the direct heartbeats, the agent's
report, drain requests and fence acks; VM views the VirtualMachine and its migrations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from controller.runtime import layout_keys
from crds import ClusterNode, VirtualMachine
from crds.migration import PLACEMENT_SWITCHED, VirtualMachineMigration

from . import requests
from .environment import FenceConfirmation, Heard, MigrationView, NodeView, VmState, VmView
from .production_core import (
    ACKNOWLEDGED,
    ADMISSION_HELD,
    DISK_CONFLICT,
    FAILED,
    RESTART_LIMIT,
    EnvironmentCore,
)

log = logging.getLogger(__name__)

ACTIVE_STATES = ("Running", "Paused", "Migrating")
"""VM states (status.state) in which the reporting node has a qemu process for it."""
STATES: dict[str, VmState] = {
    "Running": "Running",
    "Paused": "Running",
    "Stopped": "Stopped",
    "Crashed": "Crashed",
    "Migrating": "Migrating",
    "Unknown": "Unknown",
}


ToMonotonic = Callable[[datetime], float]


class WorldViews(EnvironmentCore):
    """Building the views of `World` from the caches and the controller's `WorldKeys`."""

    def _heard(self, node: str) -> Heard | None:
        """The direct heartbeats from `node`, if the last came in the agent's current lease."""
        if self._peers is None:
            return None
        last, since = self._peers.heard_at(node), self._peers.heard_since(node)
        if last is None or since is None:
            return None
        if last < self.keys.session_at.get(node, last):
            return None
        return Heard(last=last, since=since)

    # Environment -----------------------------------------------------------------------------

    def _node_view(
        self, node: ClusterNode, vms: list[VirtualMachine], now: float, mono: ToMonotonic
    ) -> NodeView:
        name = node.metadata.name
        status = node.status
        alive = name in self.keys.heartbeats.values
        fence: FenceConfirmation | None = None
        if status.fence is not None and status.fence.how is not None:
            at = now if status.fence.confirmed_at is None else mono(status.fence.confirmed_at)
            fence = FenceConfirmation(status.fence.how, at, status.fence.method)
        report = self._report(name)
        if report is not None:
            domains = report.domains
        else:  # no agent report: what the VMs' statuses say runs there
            domains = frozenset(
                vm.metadata.name
                for vm in vms
                if vm.status.node == name and vm.status.state in ACTIVE_STATES
            )
        clean_since: float | None = None
        if (
            report is not None
            and fence is not None
            and status.fence is not None
            and report.cleaned_fence is not None
            and report.cleaned_fence == status.fence.confirmed_at
        ):
            clean_since = fence.at
        drain = self._drain(name)
        spec = node.spec
        if drain is not None and not spec.cordoned:
            spec = spec.model_copy(update={"cordoned": True})
        capacity = spec.capacity or status.capacity
        return NodeView(
            name=name,
            spec=spec,
            health=status.health,
            fence=fence,
            lease_alive=alive,
            lease_lost_at=None if alive else self.keys.lease_lost_at(name),
            clean_since=clean_since,
            fence_ack_at=self._fence_ack_at(name),
            domains=domains,
            cpus=capacity.cpus if capacity else None,
            memory_mib=capacity.memory_mib if capacity else None,
            drain=None if drain is None else drain.mode,
            heard=self._heard(name),
            storage_lost=self._storage_seen.seen(
                name, [lost.path for lost in status.storage_lost], now
            ),
        )

    def _report(self, node: str) -> requests.NodeReport | None:
        value = self.keys.reports.values.get(node)
        if value is None:
            return None
        try:
            return requests.parse_report(self._key(layout_keys.report(node)), value)
        except requests.RequestFormatError as error:
            log.error("ignoring the report of %s: %s", node, error)
            return None

    def _drain(self, node: str) -> requests.DrainRequest | None:
        value = self.keys.drains.values.get(node)
        if value is None:
            return None
        try:
            return requests.parse_drain(self._key(layout_keys.drain(node)), value)
        except requests.RequestFormatError as error:
            log.error("ignoring the drain request of %s: %s", node, error)
            return None

    def _fence_ack_at(self, node: str) -> float | None:
        """When this term first saw the pending ack of `node` (None if there is none)."""
        if node not in self.keys.fence_acks.values:
            self._ack_seen.pop(node, None)
            return None
        return self._ack_seen.setdefault(node, self._loop.time())

    def _vm_view(
        self,
        vm: VirtualMachine,
        migrations: list[VirtualMachineMigration],
        now: float,
        mono: ToMonotonic,
    ) -> VmView:
        name = vm.metadata.name
        status = vm.status
        placement = None if status.placement is None else status.placement.node
        state: VmState = "Stopped"
        if placement is not None and status.node == placement:
            state = STATES[status.state]
        crashed_at: float | None = None
        if state == "Crashed":
            limit = status.condition(RESTART_LIMIT)
            since = None if limit is None else limit.last_transition_time
            seen = self._crashes.get(name)
            if seen is None or seen[0] != since:
                seen = (since, now)
                self._crashes[name] = seen
            crashed_at = seen[1]
        else:
            self._crashes.pop(name, None)
        failed = status.condition(FAILED)
        conflict = status.condition(DISK_CONFLICT)
        held = status.condition(ADMISSION_HELD)
        return VmView(
            name=name,
            spec=vm.spec,
            placement=placement,
            state=state,
            crashed_at=crashed_at,
            restarts=tuple(mono(moment) for moment in status.restarts),
            relocations=status.relocations,
            failed=failed is not None and failed.status == "True",
            migration=self._migration_view(vm, migrations),
            disk_conflict=None if conflict is None else conflict.message,
            admission_hold=None if held is None else held.message,
        )

    def _migration_view(
        self, vm: VirtualMachine, migrations: list[VirtualMachineMigration]
    ) -> MigrationView | None:
        """The VM's migration as the engine sees it: in flight, or finished and not yet
        acknowledged (the newest such)."""
        placement = None if vm.status.placement is None else vm.status.placement.node
        finished: list[tuple[VirtualMachineMigration, MigrationView]] = []
        for migration in migrations:
            status = migration.status
            target = migration.spec.target_node
            source = status.source_node or placement or ""
            switched = status.condition(PLACEMENT_SWITCHED)
            if status.phase in ("Pending", "Scheduled", "Running") or (
                status.phase == "Succeeded" and switched is None
            ):
                # The migration controller validates and switches placement; until it is done
                # the engine counts both ends as possibly running the VM.
                return MigrationView(source, target, "Running", status.message)
            if status.condition(ACKNOWLEDGED) is not None:
                continue
            if status.phase == "Failed":
                finished.append(
                    (migration, MigrationView(source, target, "Failed", status.message))
                )
            elif switched is not None and switched.status == "True" and placement == target:
                finished.append((migration, MigrationView(source, target, "Succeeded")))
        if not finished:
            return None
        self._migration_names[vm.metadata.name] = [m.metadata.name for m, _ in finished]
        newest = max(
            finished,
            key=lambda item: (
                item[0].metadata.creation_timestamp or datetime.min.replace(tzinfo=UTC),
                item[0].metadata.name,
            ),
        )
        return newest[1]

    # Writes ----------------------------------------------------------------------------------
