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

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import heartbeat_key
from controller.runtime.informer import Informer, SharedInformers
from controller.runtime.leader import LeaderElector, guard_compare
from controller.runtime.reconcile import Result, RetryableError, TerminalError, run_workers
from controller.runtime.store import Compare, Conflict, NotFound, Store
from controller.runtime.workqueue import WorkQueue
from crds import ClusterNode, VirtualMachine, VirtualMachineMigration
from crds.meta import now
from crds.migration import PLACEMENT_SWITCHED
from crds.virtualmachine import Placement
from reconcilers.migration import in_flight_migration

log = logging.getLogger(__name__)

UNHEALTHY = ("Fencing", "Fenced", "Offline")
RESYNC_PERIOD = 30.0


@dataclass(frozen=True)
class Term:
    """One term of leadership: the fencing token and the compare that guards writes with it."""

    token: int
    guard: list[Compare]

    @classmethod
    def of(cls, store: Store, election_key: str, token: int) -> Term:
        return cls(token, [guard_compare(store.client, election_key, token)])


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
        term: Term,
    ) -> None:
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
        try:
            if migration.status.phase == "Pending":
                await self._schedule(migration)
            elif (
                migration.status.phase == "Succeeded"
                and migration.status.condition(PLACEMENT_SWITCHED) is None
            ):
                await self._switch_placement(migration)
        except NotFound:
            return Result()
        except Conflict as error:
            raise RetryableError(str(error)) from None
        return Result()

    # -- Pending -> Scheduled ----------------------------------------------------------------

    async def _schedule(self, migration: VirtualMachineMigration) -> None:
        try:
            source = await self._validate(migration)
        except Invalid as error:
            await self._reject(migration, str(error))
            return

        def mutate(current: Any) -> bool:
            if current.status.phase != "Pending":
                return False
            current.status.phase = "Scheduled"
            current.status.source_node = source
            current.status.message = f"scheduled: {source} -> {migration.spec.target_node}"
            return True

        await self.store.patch_status(
            "VirtualMachineMigration", migration.metadata.name, mutate, guard=self.term.guard
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
        key = heartbeat_key(self.store.prefix, name).encode()
        if await self.store.call(self.store.client.get(key)) is None:
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

    async def _reject(self, migration: VirtualMachineMigration, reason: str) -> None:
        def mutate(current: Any) -> bool:
            if current.status.phase != "Pending":
                return False
            current.status.phase = "Failed"
            current.status.message = reason
            current.status.finished_at = now()
            return True

        await self.store.patch_status(
            "VirtualMachineMigration", migration.metadata.name, mutate, guard=self.term.guard
        )
        await self.recorder.record(migration, "Warning", "MigrationRejected", "%s", reason)

    # -- Succeeded -> placement switched -----------------------------------------------------

    async def _switch_placement(self, migration: VirtualMachineMigration) -> None:
        source, target = migration.status.source_node, migration.spec.target_node
        switched = False

        def move(vm: Any) -> bool:
            nonlocal switched
            placement = vm.status.placement
            if placement is None or placement.node != source:
                return False
            vm.status.placement = Placement(node=target, token=self.term.token, since=now())
            switched = True
            return True

        with contextlib.suppress(NotFound):
            await self.store.patch_status(
                "VirtualMachine", migration.spec.vm, move, guard=self.term.guard
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
            "VirtualMachineMigration", migration.metadata.name, mark, guard=self.term.guard
        )
        log.info("migration %s: %s", migration.metadata.name, message)


async def lead_migrations(
    store: Store, recorder: EventRecorder, term: Term, workers: int = 2
) -> None:
    """Run the migration controller for one term, until cancelled (the work of `leading`)."""
    informers = SharedInformers(store, resync_period=RESYNC_PERIOD)
    migrations = informers.informer("VirtualMachineMigration")
    controller = MigrationController(
        store,
        migrations,
        informers.informer("VirtualMachine"),
        informers.informer("ClusterNode"),
        recorder,
        term,
    )
    queue = WorkQueue()
    migrations.enqueue(queue)
    try:
        informers.start()
        await informers.wait_for_sync()
        for obj in migrations.list():
            queue.add(obj.metadata.name)

        async def on_terminal(key: str, error: TerminalError) -> None:
            log.error("migration %s: %s", key, error)

        await run_workers(queue, controller, workers, on_terminal)
    finally:
        queue.shutdown()
        await asyncio.shield(informers.stop())


async def serve_migrations(store: Store, identity: str, election: str = "controller") -> None:
    """Campaign as `identity`; run the migration controller while leading, until cancelled."""
    recorder = EventRecorder(store, "kvmctl-controller")
    elector = LeaderElector(store.client, store.prefix, election, identity)

    async def leading(token: int) -> None:
        await lead_migrations(store, recorder, Term.of(store, elector.key, token))

    await elector.run(leading)
