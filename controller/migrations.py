"""Controller side of live migration: the leader validates requests and switches placement.

For each VirtualMachineMigration (keyed by name), leader only, every write guarded by the
leader's fencing token:

- Pending: validate (the VM exists, is placed and running there, allows migration and has no
  other migration in flight; the target node exists, is online, not cordoned, not the source,
  and has room) -> Scheduled with `sourceNode`, or Failed with the reason and a Warning event.
- Succeeded (reported by the source agent, `reconcilers/migration.py`): write the VM's
  `status.placement` = target with a new token, then mark the request `PlacementSwitched`.

A target is online when the HA controller says so (`status.health: Online`); while nobody has
written a health yet (`Unknown`), when its agent reported a libvirt URI and its heartbeat key
exists.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from controller.runtime import layout_keys, telemetry
from controller.runtime.controller import Controller
from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer, SharedInformers
from controller.runtime.manager import Manager
from controller.runtime.manager import Term as Term  # re-exported: the HA modules use it
from controller.runtime.reconcile import Result, RetryableError
from controller.runtime.store import Conflict, NotFound, Store
from crds import ClusterNode, VirtualMachine, VirtualMachineMigration
from crds.meta import now
from crds.migration import PLACEMENT_SWITCHED
from crds.virtualmachine import Placement
from reconcilers.migration import in_flight_migration

log = logging.getLogger(__name__)

UNHEALTHY = ("Fencing", "Fenced", "Offline")
RESYNC_PERIOD = 30.0


class Invalid(Exception):
    """The request cannot be carried out; the message says why."""


class MigrationController:
    """Leader-only reconciler of VirtualMachineMigrations; see the module docstring."""

    def __init__(
        self,
        store: Store,
        migrations: Informer,
        vms: Informer,
        nodes: Informer,
        recorder: EventRecorder,
        term: Callable[[], Term],
    ) -> None:
        """`term()` is the term leading now (RetryableError when none)."""
        self.store = store
        self.migrations = migrations
        self.vms = vms
        self.nodes = nodes
        self.recorder = recorder
        self.term = term

    async def reconcile(self, key: str) -> Result:
        migration = self.migrations.get(key)
        if not isinstance(migration, VirtualMachineMigration):
            return Result()
        term = self.term()
        try:
            if migration.status.phase == "Pending":
                await self._schedule(migration, term)
            elif (
                migration.status.phase == "Succeeded"
                and migration.status.condition(PLACEMENT_SWITCHED) is None
            ):
                await self._switch_placement(migration, term)
        except NotFound:
            return Result()
        except Conflict as error:
            raise RetryableError(str(error)) from None
        return Result()

    # -- Pending -> Scheduled ----------------------------------------------------------------

    async def _schedule(self, migration: VirtualMachineMigration, term: Term) -> None:
        try:
            source = await self._validate(migration)
        except Invalid as error:
            await self._reject(migration, str(error), term)
            return

        def mutate(current: Any) -> bool:
            if current.status.phase != "Pending":
                return False
            current.status.phase = "Scheduled"
            current.status.source_node = source
            current.status.message = f"scheduled: {source} -> {migration.spec.target_node}"
            return True

        await self.store.patch_status(
            "VirtualMachineMigration", migration.metadata.name, mutate, guard=term.guard
        )
        log.info("migration %s scheduled from %s", migration.metadata.name, source)

    async def _validate(self, migration: VirtualMachineMigration) -> str:
        """The source node, or Invalid with the reason."""
        vm_name, target_name = migration.spec.vm, migration.spec.target_node
        vm = self.vms.get(vm_name)
        if not isinstance(vm, VirtualMachine):
            raise Invalid(f"VirtualMachine {vm_name} not found")
        placement = vm.status.placement
        if placement is None:
            raise Invalid(f"VirtualMachine {vm_name} is not placed on any node")
        source = placement.node
        if vm.metadata.deletion_timestamp is not None:
            raise Invalid(f"VirtualMachine {vm_name} is being deleted")
        if vm.spec.run_state != "started" or vm.status.state != "Running":
            raise Invalid(f"VirtualMachine {vm_name} is not running (state {vm.status.state})")
        if vm.status.node != source:
            raise Invalid(f"VirtualMachine {vm_name} does not run on its node {source} yet")
        if not vm.spec.migration.allowed:
            raise Invalid(f"VirtualMachine {vm_name} does not allow migration")
        if target_name == source:
            raise Invalid(f"VirtualMachine {vm_name} already runs on {target_name}")
        for node in (source, target_name):
            other = in_flight_migration(self.migrations.list(), vm_name, node)
            if other is not None and other.metadata.name != migration.metadata.name:
                raise Invalid(f"migration {other.metadata.name} of {vm_name} is in flight")
        target = self.nodes.get(target_name)
        if not isinstance(target, ClusterNode):
            raise Invalid(f"target node {target_name} not found")
        if target.spec.cordoned:
            raise Invalid(f"target node {target_name} is cordoned")
        await self._check_online(target)
        self._check_capacity(vm, target)
        return source

    async def _check_online(self, target: ClusterNode) -> None:
        name = target.metadata.name
        health = target.status.health
        if health == "Online":
            return
        if health in UNHEALTHY:
            raise Invalid(f"target node {name} is {health}")
        if target.status.libvirt_uri is None:
            raise Invalid(f"target node {name} has no agent reporting (no libvirt URI)")
        if await self.store.keys.get(self.store.raw_key(layout_keys.heartbeat(name))) is None:
            raise Invalid(f"target node {name} has no heartbeat")

    def _check_capacity(self, vm: VirtualMachine, target: ClusterNode) -> None:
        capacity = target.spec.capacity or target.status.capacity
        if capacity is None:
            return  # nothing reported: libvirt refuses if the host is really full
        name = target.metadata.name
        placed = [
            other
            for other in self.vms.list()
            if isinstance(other, VirtualMachine)
            and other.status.placement is not None
            and other.status.placement.node == name
            and other.spec.run_state == "started"
        ]
        memory = sum(other.spec.memory_mib for other in placed) + vm.spec.memory_mib
        if memory > capacity.memory_mib:
            raise Invalid(
                f"target node {name} lacks memory: {memory} MiB needed, "
                f"{capacity.memory_mib} MiB available"
            )

    async def _reject(self, migration: VirtualMachineMigration, reason: str, term: Term) -> None:
        def mutate(current: Any) -> bool:
            if current.status.phase != "Pending":
                return False
            current.status.phase = "Failed"
            current.status.message = reason
            current.status.finished_at = now()
            return True

        await self.store.patch_status(
            "VirtualMachineMigration", migration.metadata.name, mutate, guard=term.guard
        )
        telemetry.count_migration("rejected")
        await self.recorder.record(migration, "Warning", "MigrationRejected", "%s", reason)

    # -- Succeeded -> placement switched -----------------------------------------------------

    async def _switch_placement(self, migration: VirtualMachineMigration, term: Term) -> None:
        source, target = migration.status.source_node, migration.spec.target_node
        switched = False

        def move(vm: Any) -> bool:
            nonlocal switched
            placement = vm.status.placement
            if placement is None or placement.node != source:
                return False
            vm.status.placement = Placement(node=target, token=term.token, since=now())
            switched = True
            return True

        with contextlib.suppress(NotFound):
            await self.store.patch_status(
                "VirtualMachine", migration.spec.vm, move, guard=term.guard
            )
        if switched:
            reason, message = "Switched", f"placement moved from {source} to {target}"
        else:
            reason, message = "PlacementChanged", "the VM was no longer placed on the source"

        def mark(current: Any) -> bool:
            return bool(
                current.status.set_condition(
                    PLACEMENT_SWITCHED, "True" if switched else "False", reason, message
                )
            )

        await self.store.patch_status(
            "VirtualMachineMigration", migration.metadata.name, mark, guard=term.guard
        )
        log.info("migration %s: %s", migration.metadata.name, message)


def migration_controller(
    store: Store,
    informers: SharedInformers,
    recorder: EventRecorder,
    term: Callable[[], Term],
    leader_only: bool = True,
) -> Controller:
    """The migration controller's registration with a manager (`term`: its `Manager.term`)."""
    reconciler = MigrationController(
        store,
        informers.informer("VirtualMachineMigration"),
        informers.informer("VirtualMachine"),
        informers.informer("ClusterNode"),
        recorder,
        term,
    )
    kind = "VirtualMachineMigration"
    return Controller("migrations", kind, reconciler, workers=2, leader_only=leader_only)


async def lead_migrations(store: Store, recorder: EventRecorder, term: Term) -> None:
    """Run the migration controller for the given term on its own, until cancelled (for a
    stand-in of the controller daemon; `store` stays open)."""
    informers = SharedInformers(store, resync_period=RESYNC_PERIOD)
    controller = migration_controller(store, informers, recorder, lambda: term, leader_only=False)
    manager = Manager(store, [controller], informers=informers, http_port=None, close_store=False)
    await manager.run(handle_signals=False)
